"""`swarm-client` and its commands (`main.py` dispatches): generate, chat, score, batch, status, estimate,
serve, and `swarm-demo` (`demo.py`)."""
