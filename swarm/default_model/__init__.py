"""The tiny Llama checkpoint that ships inside swarm.

It lets tests and demos run a real Hugging Face model fully offline: a
~1.6M-parameter ``LlamaForCausalLM`` trained on synthetic children's stories,
small enough to embed in the package. ``scripts/build_default_model.py``
rebuilds it. Beside it ships ``tiny-stories-draft``, a ~0.3M-parameter model
distilled from it (``scripts/build_draft_model.py``) that drafts tokens for
speculative decoding.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["DEFAULT_DRAFT_NAME", "DEFAULT_MODEL_NAME", "default_draft_path", "default_model_path"]

DEFAULT_MODEL_NAME = "tiny-stories"
DEFAULT_DRAFT_NAME = "tiny-stories-draft"


def default_model_path() -> Path:
    """Return the folder of the bundled checkpoint, ready for ``from_pretrained``.

    A real filesystem path is returned (not a resource handle) because
    ``transformers`` and ``safetensors`` open files by path.

    Raises:
        FileNotFoundError: the checkpoint was not built or not packaged.
    """
    return _shipped(DEFAULT_MODEL_NAME, "build_default_model.py")


def default_draft_path() -> Path:
    """Return the folder of the draft model distilled from the bundled checkpoint (same tokenizer).

    Raises:
        FileNotFoundError: the draft was not built or not packaged.
    """
    return _shipped(DEFAULT_DRAFT_NAME, "build_draft_model.py")


def _shipped(name: str, script: str) -> Path:
    path = Path(str(files(__package__) / name))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name} not found at {path}; build it with `python scripts/{script} --out swarm/default_model/{name}`"
        )
    return path
