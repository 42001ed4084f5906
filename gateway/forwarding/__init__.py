"""Streaming a request on: to a backend child (proxy) or to a peer gateway (peers)."""
