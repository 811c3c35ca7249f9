"""Which checkpoint a client command means when the user did not say."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from swarm.checkpoint import model_name_from_path
from swarm.client.core.planner import fetch_peers
from swarm.errors import CheckpointError, RegistryUnavailableError
from swarm.transport import Credentials

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from swarm.client.core.model import DistributedModelForCausalLM
    from swarm.client.core.settings import ClientSettings

SEARCH_DIRS = ("models", ".")


async def resolve_model(
    model: str | None, registries: list[str], credentials: Credentials, models_dir: str | None = None
) -> Path:
    """`model` (`--model` or `SWARM_MODEL`), else the embedded default model when the swarm serves it (or
    nothing yet), else the only model the registry serves if its files are found in `models_dir` or the
    usual places."""
    if model:
        return Path(model)
    from swarm.default_model import default_model_path

    default = default_model_path()
    try:
        served = sorted({peer.model for peer in await fetch_peers(registries, None, credentials)})
    except RegistryUnavailableError:
        return default
    if not served or model_name_from_path(default) in served:
        return default
    if len(served) == 1:
        for folder in _search_dirs(models_dir):
            candidate = folder / served[0]
            if (candidate / "config.json").is_file():
                return candidate
        raise CheckpointError(
            f"the swarm serves {served[0]!r} but its checkpoint folder was not found in "
            f"{', '.join(str(d) for d in _search_dirs(models_dir))}; pass --model PATH (or set SWARM_MODEL)"
        )
    raise CheckpointError(f"the swarm serves several models ({', '.join(served)}); pick one with --model PATH")


def _search_dirs(models_dir: str | None) -> list[Path]:
    return ([Path(models_dir)] if models_dir else []) + [Path(d) for d in SEARCH_DIRS]


def open_model(settings: ClientSettings) -> tuple[DistributedModelForCausalLM, PreTrainedTokenizerBase]:
    """The checkpoint a command means, loaded as a swarm client, with its tokenizer."""
    from transformers import AutoTokenizer

    from swarm.client.core.loop import EventLoopThread
    from swarm.client.core.model import DistributedModelForCausalLM

    resolver = EventLoopThread()
    try:
        path = resolver.run(
            resolve_model(settings.model, settings.registry, settings.credentials(), settings.models_dir)
        )
    finally:
        resolver.close()
    tokenizer = AutoTokenizer.from_pretrained(path)
    distributed = DistributedModelForCausalLM.from_pretrained(
        path,
        settings.registry,
        model_name=settings.model_name,
        token=settings.token,
        tls_ca=settings.tls_ca,
        compression=settings.compression,
        verify_rate=settings.verify_rate,
        forwarding=settings.forwarding,
    )
    apply_tuning_files(distributed, settings.soft_prompt, settings.adapter)
    return distributed, tokenizer


def apply_tuning_files(model: DistributedModelForCausalLM, soft_prompt: str | None, adapter: str | None) -> None:
    """Run `model` with the soft prompt of one tuning file and the adapter of another (or of the same one)."""
    from swarm.client.core.tuning import Tuning

    prompt = model.read_tuning(soft_prompt).soft_prompt if soft_prompt else None
    lora = model.read_tuning(adapter).adapter if adapter else None
    if soft_prompt and prompt is None:
        raise ValueError(f"{soft_prompt} holds no soft prompt (it was tuned with --lora only); pass it as --adapter")
    if adapter and lora is None:
        raise ValueError(
            f"{adapter} holds no adapter (it was tuned with --prompt-tokens only); pass it as --soft-prompt"
        )
    if prompt is not None or lora is not None:
        model.tuning = Tuning(model.planner.model_name, prompt, lora)
