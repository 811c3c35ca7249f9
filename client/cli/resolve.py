"""Which checkpoint a client command means when the user did not say."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from swarm.client.core.planner import fetch_peers

from swarm.checkpoint import model_name_from_path
from swarm.errors import CheckpointError, RegistryUnavailableError
from swarm.transport import Credentials

if TYPE_CHECKING:
    from swarm.client.core.model import DistributedModelForCausalLM
    from transformers import PreTrainedTokenizerBase

SEARCH_DIRS = ("models", ".")


async def resolve_model(model: str | None, registries: list[str], credentials: Credentials) -> Path:
    """`--model`, else `SWARM_MODEL`, else the embedded default model when the swarm serves it (or
    nothing yet), else the only model the registry serves if its files are found locally."""
    explicit = model or os.environ.get("SWARM_MODEL")
    if explicit:
        return Path(explicit)
    from swarm.default_model import default_model_path

    default = default_model_path()
    try:
        served = sorted({peer.model for peer in await fetch_peers(registries, None, credentials)})
    except RegistryUnavailableError:
        return default
    if not served or model_name_from_path(default) in served:
        return default
    if len(served) == 1:
        for folder in _search_dirs():
            candidate = folder / served[0]
            if (candidate / "config.json").is_file():
                return candidate
        raise CheckpointError(
            f"the swarm serves {served[0]!r} but its checkpoint folder was not found in "
            f"{', '.join(str(d) for d in _search_dirs())}; pass --model PATH (or set SWARM_MODEL)"
        )
    raise CheckpointError(f"the swarm serves several models ({', '.join(served)}); pick one with --model PATH")


def _search_dirs() -> list[Path]:
    extra = os.environ.get("SWARM_MODELS_DIR")
    return ([Path(extra)] if extra else []) + [Path(d) for d in SEARCH_DIRS]


def open_model(
    model: str | None,
    model_name: str | None,
    registries: list[str],
    credentials: Credentials,
    compression: str | None = None,
) -> tuple[DistributedModelForCausalLM, PreTrainedTokenizerBase]:
    """The checkpoint a command means, loaded as a swarm client, with its tokenizer."""
    from swarm.client.core.loop import EventLoopThread
    from swarm.client.core.model import DistributedModelForCausalLM
    from transformers import AutoTokenizer

    resolver = EventLoopThread()
    try:
        path = resolver.run(resolve_model(model, registries, credentials))
    finally:
        resolver.close()
    tokenizer = AutoTokenizer.from_pretrained(path)
    distributed = DistributedModelForCausalLM.from_pretrained(
        path,
        registries,
        model_name=model_name,
        token=credentials.token,
        tls_ca=credentials.ca_file,
        compression=compression,
    )
    return distributed, tokenizer
