"""Time per token over a simulated WAN: client in the middle of every hop, node-to-node forwarding, and forwarding
with speculative decoding, on the same swarm of 4 nodes.

Every registry and node sits behind a delaying proxy (`swarm.client.wan`: `lan` 1 ms, `metro` 20 ms at 1 Gbit/s,
`home` 60 ms at 50 Mbit/s with 0.5 % loss). The model is the embedded demo model (a story model: names repeat,
so prompt-lookup drafts hit), greedy, from a story opening. The modes alternate, repeated `--repeats`
times, and every figure is a median; each mode's output must be the client-in-the-middle output, token for token.
`--temperature T` samples instead, as `swarm-client chat` does (its seeded sampler, a seed per repeat): modes
without drafts must still draw the same tokens; drafts keep the distribution but change what a seed draws.
Time per token is decoding's (from the first new token to the last, per token), beside the whole call's seconds
(which adds opening the sessions, the prompt and closing).
Bytes per token per link come from the proxies' counters: what each node received (up) and sent (down).

With the client in the middle, a token waits 2 one-way trips per node; forwarded, 1 per node plus 1 back, so on
links of equal delay the floor of forwarded / in-the-middle is (n + 1) / 2n: 0.625 at 4 nodes.

    python bench/wan.py                       # home profile
    python bench/wan.py --profiles lan,metro,home --tokens 48
    python bench/wan.py --temperature 0.7     # sampled, as chat samples by default
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository first, not bench/ (see bench/__init__.py)

from swarm.runtime import quiet_optional_backends

quiet_optional_backends()  # before transformers imports torchao, which logs what this machine cannot load

import argparse
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import (
    AutoTokenizer,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from bench.common import THREADS_HELP, median, use_threads, write_json
from swarm.client import DistributedModelForCausalLM
from swarm.client.core.drafts import DEFAULT_DRAFT, load_draft_model, speculation_kwargs
from swarm.client.local_swarm import LocalSwarm
from swarm.client.serve.sampling import sampling_processors
from swarm.default_model import default_model_path

PROMPT = (
    "Once upon a time, there was a kind boy named Leo. Leo had a red ball. Leo liked to play with his red ball "
    "in the park. One day, Leo"
)
MODES = {
    "client in the middle": dict(forwarding=False, speculate=0),
    "forwarding": dict(forwarding=True, speculate=0),
    "forwarding + prompt lookup": dict(forwarding=True, speculate=8),
    "forwarding + draft model": dict(forwarding=True, speculate=8, drafter="draft"),
    "forwarding + perfect drafts": dict(forwarding=True, speculate=8, drafter="perfect"),
}
"""Where speculation's drafts come from: prompt lookup drafts from the text so far and gains only where the model
repeats it; `draft model` is `swarm-client generate --draft-model default`, the ~0.3M-parameter model distilled
from the demo model and shipped beside it; `perfect drafts` drafts with a local copy of the model itself, so
every draft is right: the most speculation can give."""


class DecodeClock(StoppingCriteria):
    """When each decoding step ended and how long the sequence was then (a speculative step adds several
    tokens): decode time per token, without the session's opening, the prompt and the closing."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        self.marks.append((time.perf_counter(), input_ids.shape[1]))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def seconds_per_token(self) -> float:
        (first, first_length), (last, last_length) = self.marks[0], self.marks[-1]
        return (last - first) / max(last_length - first_length, 1)


def run_mode(
    model: DistributedModelForCausalLM,
    ids: torch.Tensor,
    tokens: int,
    forwarding: bool,
    speculate: int,
    drafter: PreTrainedModel | None = None,
    temperature: float = 0.0,
    seed: int = 0,
):
    """Decode seconds per token, the whole call's seconds, and the new tokens."""
    model.planner.forwarding = forwarding
    clock = DecodeClock()
    began = time.perf_counter()
    output = model.generate(  # (transformers warns that min_new_tokens meets the drafter's generation config)
        ids,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList(sampling_processors(temperature, seed=seed)),
        stopping_criteria=StoppingCriteriaList([clock]),
        **speculation_kwargs(speculate, drafter),
    )
    return clock.seconds_per_token(), time.perf_counter() - began, output[0, ids.shape[1] :].tolist()


def measure(profile: str, tokens: int, repeats: int, threads: int | None, temperature: float) -> dict[str, object]:
    checkpoint = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    drafters = {
        "draft": load_draft_model(DEFAULT_DRAFT, tokenizer, 8),
        "perfect": load_draft_model(checkpoint, tokenizer, 8),
    }
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir), threads=threads, wan=profile) as swarm:
        swarm.start_registry()
        nodes = [swarm.start_node(checkpoint, layers) for layers in ("0-1", "2-3", "4-5", "6-7")]
        swarm.wait_ready(checkpoint.name, timeout=120)
        model = DistributedModelForCausalLM.from_pretrained(checkpoint, registry=swarm.registry_url, verify_rate=0)
        try:
            run_mode(model, ids, 4, forwarding=True, speculate=0)  # warm-up: connections, sessions, caches
            seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
            whole: dict[str, list[float]] = {mode: [] for mode in MODES}
            traffic: dict[str, list[tuple[int, int]]] = {mode: [] for mode in MODES}
            for repeat in range(repeats):
                reference: list[int] | None = None
                for mode, options in MODES.items():
                    before = [(swarm.proxies[n.name].bytes_up, swarm.proxies[n.name].bytes_down) for n in nodes]
                    options = {**options, "drafter": drafters.get(str(options.get("drafter")))}
                    per_token, elapsed, new = run_mode(
                        model,
                        ids,
                        tokens,
                        **options,  # type: ignore[arg-type]
                        temperature=temperature,
                        seed=repeat,
                    )
                    after = [(swarm.proxies[n.name].bytes_up, swarm.proxies[n.name].bytes_down) for n in nodes]
                    seconds[mode].append(per_token)
                    whole[mode].append(elapsed)
                    traffic[mode] = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]
                    reference = new if reference is None else reference
                    if new != reference and (temperature == 0 or not options["speculate"]):
                        raise AssertionError(f"{mode} changed the output: {new} != {reference}")
        finally:
            model.close()
    baseline = median(seconds["client in the middle"])
    return {
        "profile": profile,
        "tokens": tokens,
        "temperature": temperature,
        "modes": {
            mode: {
                "ms_per_token": median(values) * 1000,
                "tokens_per_second": 1 / median(values),
                "over_client_in_the_middle": median(values) / baseline,
                "whole_call_seconds": median(whole[mode]),
                "bytes_per_token_per_link": [
                    {"node": node.name, "up": up / tokens, "down": down / tokens}
                    for node, (up, down) in zip(nodes, traffic[mode], strict=True)
                ],
            }
            for mode, values in seconds.items()
        },
        "identical_output": "every mode" if temperature == 0 else "modes without drafts",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default="home", help="comma-separated: lan, metro, home, mixed (default home)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy)")
    parser.add_argument("--threads", default="default", help=THREADS_HELP)
    parser.add_argument(
        "--json", type=Path, help="results file (default bench/results/wan.json, sampled wan-sampled.json)"
    )
    args = parser.parse_args()
    threads = use_threads(args.threads)
    profiles = args.profiles.split(",")
    results = [measure(profile, args.tokens, args.repeats, threads, args.temperature) for profile in profiles]
    decoding = "greedy" if args.temperature == 0 else f"sampled at temperature {args.temperature}"
    same = "output identical" if args.temperature == 0 else "identical output without drafts"
    table = Table(title=f"4 nodes, {args.tokens} new tokens, {decoding} (medians of {args.repeats}); {same}")
    columns = ("profile", "mode", "ms / token", "tokens / s", "vs in the middle", "whole call s", "B / token / link")
    for column in columns:
        table.add_column(column)
    for result in results:
        for mode, figures in result["modes"].items():  # type: ignore[union-attr]
            links = figures["bytes_per_token_per_link"]
            up = median([link["up"] for link in links])
            down = median([link["down"] for link in links])
            table.add_row(
                str(result["profile"]),
                mode,
                f"{figures['ms_per_token']:.1f}",
                f"{figures['tokens_per_second']:.2f}",
                f"{figures['over_client_in_the_middle']:.2f}",
                f"{figures['whole_call_seconds']:.2f}",
                f"{up:.0f} in, {down:.0f} out",
            )
    Console(width=160).print(table)
    default_json = "wan.json" if args.temperature == 0 else "wan-sampled.json"
    write_json(args.json or Path(__file__).parent / "results" / default_json, {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
