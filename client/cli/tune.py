"""`swarm-client tune DATA.jsonl --out FILE`: learn a soft prompt and/or a low-rank adapter through the swarm.

Saves every `--save-every` steps and at the end; the same command run again continues from the last save (the
loss curve as if it had never stopped), `--restart` starts over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from swarm.client.cli.resolve import open_model
from swarm.client.core.settings import ClientSettings
from swarm.client.core.tuner import TuneConfig, Tuner, read_examples, state_path


def run(args: argparse.Namespace, settings: ClientSettings) -> int:
    if args.prompt_tokens is None and args.lora is None:
        raise ValueError("say what to train: --prompt-tokens N (a soft prompt), --lora RANK (an adapter), or both")
    model, tokenizer = open_model(settings)
    try:
        if args.prompt_tokens is not None:
            init = None
            if args.init_text:
                init = tokenizer(args.init_text, add_special_tokens=False, return_tensors="pt").input_ids
            model.add_soft_prompt(args.prompt_tokens, init, seed=args.seed)
        if args.lora is not None:
            model.add_adapter(args.lora, args.lora_alpha, seed=args.seed)
        assert model.tuning is not None
        examples = read_examples(args.data, tokenizer, args.max_tokens)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        config = TuneConfig(args.steps, args.batch_size, learning_rate(args), args.seed)
        tuner = Tuner(model, model.tuning, examples, config, pad)
        out = Path(args.out)
        losses: list[float] = []
        if not args.restart and out.is_file() and state_path(out).is_file():
            losses = tuner.resume(out)
            print(f"resuming {out} at step {tuner.step_done} of {config.steps}", file=sys.stderr)
        print(
            f"training {model.tuning.describe()} on {len(examples)} examples through the swarm",
            file=sys.stderr,
        )
        with _progress() as progress:
            task = progress.add_task("tuning", total=config.steps, completed=tuner.step_done, loss=float("nan"))

            def after(step: int, loss: float) -> None:
                losses.append(loss)
                progress.update(task, completed=step, loss=loss)
                if step % args.save_every == 0 or step == config.steps:
                    tuner.save(out, losses)

            tuner.run(after)
        if losses:
            first, last = losses[0], sum(losses[-5:]) / len(losses[-5:])
            print(
                f"loss {first:.4f} at the first step, {last:.4f} over the last {min(5, len(losses))}", file=sys.stderr
            )
        print(f"saved {out}", file=sys.stderr)
    finally:
        model.close()
    return 0


def learning_rate(args: argparse.Namespace) -> float:
    """`--learning-rate`, else what trains each kind in about a hundred steps on the demo model: 0.1 for a soft
    prompt alone (a handful of vectors, each a whole token's embedding), 0.003 once an adapter trains."""
    if args.learning_rate is not None:
        return args.learning_rate
    return 0.003 if args.lora is not None else 0.1


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
