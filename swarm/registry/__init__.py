"""The registry: which peer serves which layers of which model (`state.py`), its websocket and HTTP server with
the dashboard (`server.py`, `static/`), its Prometheus metrics (`metrics.py`), and the client side that nodes
and clients use to talk to it (`client.py`)."""
