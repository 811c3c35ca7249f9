"""The tiny Llama checkpoint that ships inside swarm.

It lets tests and demos run a real Hugging Face model fully offline: a
~1.6M-parameter ``LlamaForCausalLM`` trained on synthetic children's stories,
small enough to embed in the package. ``scripts/build_default_model.py``
rebuilds it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["DEFAULT_MODEL_NAME", "default_model_path"]

DEFAULT_MODEL_NAME = "tiny-stories"


def default_model_path() -> Path:
    """Return the folder of the bundled checkpoint, ready for ``from_pretrained``.

    A real filesystem path is returned (not a resource handle) because
    ``transformers`` and ``safetensors`` open files by path.

    Raises:
        FileNotFoundError: the checkpoint was not built or not packaged.
    """
    path = Path(str(files(__package__) / DEFAULT_MODEL_NAME))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"default model not found at {path}; build it with `python "
            f"scripts/build_default_model.py --out swarm/default_model/{DEFAULT_MODEL_NAME}`"
        )
    return path
