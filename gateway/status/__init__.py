"""The node's health as one typed model (`/health`), and the metrics read from it."""
