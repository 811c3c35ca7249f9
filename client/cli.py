"""`swarm-client`: generate text through the swarm and inspect what it serves."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import torch
from rich.console import Console

from client.loop import EventLoopThread
from swarm.errors import SwarmError
from swarm.runtime import setup_logging
from swarm.settings import parse_registries
from swarm.transport import Credentials

EXAMPLES = """examples:
  swarm-client status --wait-ready 60
  swarm-client generate "Once upon a time" --max-new-tokens 40
  swarm-client generate "Once upon a time" --model ./models/tiny-llama --registry ws://127.0.0.1:7000 --greedy
  swarm-client generate "The dragon" --temperature 0.8 --top-p 0.95 --seed 1
  swarm-client status --json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-client",
        description="Use a model whose layers are served by a swarm of peers.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry", help="registry URL(s), comma-separated (env SWARM_REGISTRY; default ws://127.0.0.1:7000)"
    )
    common.add_argument("--token", help="shared secret of a private swarm (env SWARM_TOKEN)")
    common.add_argument("--tls-ca", help="CA certificate file to trust for wss:// peers (env SWARM_TLS_CA)")
    common.add_argument("--log-level", default="WARNING", help="diagnostics on stderr (default WARNING)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        parents=[common],
        help="continue a prompt, streaming to stdout",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("prompt", help="text to continue")
    generate.add_argument(
        "--model",
        help="checkpoint folder (env SWARM_MODEL; default: the embedded demo model, "
        "or the only model the swarm serves)",
    )
    generate.add_argument("--model-name", help="name in the swarm (default: last component of --model)")
    generate.add_argument("--max-new-tokens", type=int, default=40)
    generate.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    generate.add_argument("--temperature", type=float, help="sampling temperature (implies sampling)")
    generate.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    generate.add_argument("--top-p", type=float, help="nucleus sampling probability mass")
    generate.add_argument("--seed", type=int, help="seed for reproducible sampling")

    status = commands.add_parser("status", parents=[common], help="coverage of each model the swarm serves")
    status.add_argument("--model", help="only this model (its swarm name)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--wait-ready", type=float, metavar="SECONDS", help="wait until every layer is served; exit code 1 on timeout"
    )
    return parser


def sampling_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """Map CLI flags onto `generate()` arguments; unset flags keep the checkpoint's own defaults."""
    if args.greedy:
        return {"do_sample": False}
    chosen = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    chosen = {key: value for key, value in chosen.items() if value is not None}
    return {"do_sample": True, **chosen} if chosen else {}


def run_generate(args: argparse.Namespace, registries: list[str], credentials: Credentials) -> int:
    from transformers import AutoTokenizer, TextStreamer

    from client.model import DistributedModelForCausalLM
    from client.resolve import resolve_model

    resolver = EventLoopThread()
    try:
        model_path = resolver.run(resolve_model(args.model, registries, credentials))
    finally:
        resolver.close()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = DistributedModelForCausalLM.from_pretrained(
        model_path, registries, model_name=args.model_name, token=credentials.token, tls_ca=credentials.ca_file
    )
    try:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        inputs = tokenizer(args.prompt, return_tensors="pt")
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, streamer=streamer, pad_token_id=pad, **sampling_kwargs(args)
        )
    finally:
        model.close()
    return 0


def run_status(args: argparse.Namespace, registries: list[str], credentials: Credentials) -> int:
    from client.status import swarm_status, wait_ready

    runner = EventLoopThread()
    try:
        if args.wait_ready is not None:
            try:
                status = runner.run(wait_ready(registries, credentials, args.model, args.wait_ready))
            except TimeoutError as exc:
                status = exc.args[0] if exc.args else {"models": [], "peers": []}
                _print_status(status, args.json)
                what = f"model {args.model!r}" if args.model else "every model"
                print(f"swarm-client: {what} not fully served after {args.wait_ready:g} s", file=sys.stderr)
                return 1
        else:
            status = runner.run(swarm_status(registries, credentials, args.model))
    finally:
        runner.close()
    _print_status(status, args.json)
    return 0


def _print_status(status: dict[str, object], as_json: bool) -> None:
    from client.status import render_status

    if as_json:
        print(json.dumps(status, indent=2))
    else:
        render_status(status, Console())


COMMANDS: dict[str, Callable[[argparse.Namespace, list[str], Credentials], int]] = {
    "generate": run_generate,
    "status": run_status,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        registries = parse_registries(args.registry)
        credentials = Credentials(
            token=args.token or os.environ.get("SWARM_TOKEN") or None,
            ca_file=args.tls_ca or os.environ.get("SWARM_TLS_CA") or None,
        )
        return COMMANDS[args.command](args, registries, credentials)
    except (SwarmError, ValueError) as exc:
        print(f"swarm-client: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
