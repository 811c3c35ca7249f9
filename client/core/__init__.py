"""The client itself: a Hugging Face model whose layers live in the swarm (`model.py`), its sessions over chains
of peers (`sessions.py`), failing over when a peer is lost (`failover.py`), the connection to each peer
(`channel.py`), route planning (`planner.py`) and continuous batching of concurrent generations
(`scheduler.py`, `grouped_steps.py`), and where speculative decoding's drafts come from (`drafts.py`)."""
