"""swarm: peer-to-peer collaborative inference for large language models.

One import name for the whole project: the shared core lives here (`protocol`, `transport`, `models`,
`checkpoint`, `routing`, `registry`, ...), the node in `swarm.node` and the client in `swarm.client`. Importing
any of them has no side effects.
"""

__version__ = "0.1.0"
