"""swarm: peer-to-peer collaborative inference for large language models (shared core)."""

import logging

__version__ = "0.1.0"


def _quiet_optional_backends() -> None:
    """torchao (installed for `--quantize int8`) is imported by `transformers` in every process; on import it
    logs a warning for each GPU kernel library this machine cannot load and for each enum it registers with
    torch.compile. Neither matters here, and they would bury the output of every command."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


_quiet_optional_backends()
