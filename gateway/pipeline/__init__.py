"""The request path (spec section 4): an ordered list of stages, then dispatch.

- `stages.py`: `STAGES`, the list, and each check of the request, in order;
- `dispatch.py`: the last stage, to a backend child of this node or to a peer gateway;
- `exchange.py`: the per-request object the stages share, and what they use of the gateway;
- `handler.py`: the aiohttp handler that runs the stages and accounts for each request.
"""
