"""int8 weights vs float32: memory of the hosted layers, and how far the outputs move.

Runs the embedded tiny-stories model (or `--model`) in-process: the layers loaded in float32 and
with `--quantize int8`, the same fixed prompts through both; reports layer memory, max/mean logit
error, next-token agreement, and whether 32-token greedy continuations stay identical.

    python bench/quantize.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository first, not bench/ (see bench/__init__.py)

from swarm.runtime import quiet_optional_backends

quiet_optional_backends()  # before transformers imports torchao, which logs what this machine cannot load

import argparse
import statistics

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import write_json
from swarm.default_model import default_model_path
from swarm.node.span import LoadedSpan

PROMPTS = [
    "Once upon a time",
    "One day, a little girl named Lily",
    "The dog ran to the park and",
    "Tom was sad because",
    "Once upon a time, there was a big red ball",
    "Mia and her mom went to the store.",
    "The bird sang a happy song",
    "Ben found a shiny rock. He",
]


def greedy(model: AutoModelForCausalLM, span: LoadedSpan, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation with the layers replaced by `span` (full recompute each step: simple and exact)."""
    for _ in range(new_tokens):
        logits = run(model, span, ids)
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[0].tolist()


def run(model: AutoModelForCausalLM, span: LoadedSpan, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1])[None]
    mask = torch.ones_like(ids, dtype=torch.bool)
    hidden = span.forward_stateless(model.model.embed_tokens(ids), positions, mask, span.start, span.end)
    return model.lm_head(model.model.norm(hidden))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a Llama-family checkpoint (default: tiny-stories)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = model.config.num_hidden_layers
    cpu = torch.device("cpu")
    exact = LoadedSpan.load(path, 0, layers, cpu, torch.float32, show_progress=False)
    int8 = LoadedSpan.load(path, 0, layers, cpu, torch.float32, show_progress=False, quantize="int8")
    errors, agreement, identical = [], [], 0
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            reference, approx = run(model, exact, ids), run(model, int8, ids)
            errors.append((approx - reference).abs().max().item())
            agreement.append((approx.argmax(-1) == reference.argmax(-1)).float().mean().item())
            identical += greedy(model, exact, ids, args.new_tokens) == greedy(model, int8, ids, args.new_tokens)
    memory = {"float32": exact.weight_bytes, "int8": int8.weight_bytes}
    result = {
        "layer_bytes": memory,
        "memory_ratio": memory["int8"] / memory["float32"],
        "max_logit_error": max(errors),
        "median_logit_error": statistics.median(errors),
        "next_token_agreement": statistics.mean(agreement),
        "identical_greedy_continuations": f"{identical}/{len(PROMPTS)}",
    }
    table = Table(title=f"int8 vs float32 weights, {path.name} ({layers} layers), {len(PROMPTS)} prompts")
    for column in (
        "layers float32",
        "layers int8",
        "int8/float32",
        "max |dlogit|",
        "median |dlogit|",
        "next-token agreement",
        f"identical {args.new_tokens}-token greedy",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        f"{memory['float32'] / 2**20:.2f} MiB",
        f"{memory['int8'] / 2**20:.2f} MiB",
        f"{result['memory_ratio']:.2f}",
        f"{result['max_logit_error']:.3f}",
        f"{result['median_logit_error']:.3f}",
        f"{result['next_token_agreement']:.3f}",
        result["identical_greedy_continuations"],
    )
    Console().print(table)
    out = args.json or Path(__file__).parent / "results" / "quantize.json"
    write_json(out, {"benchmark": "quantize", "model": path.name, **result})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
