"""`swarm-demo`: a whole swarm on this machine in one command.

Starts a registry (with its dashboard) and two nodes that split the embedded demo model's layers,
waits until every layer is served, streams a continuation of a prompt through the swarm, and
stops everything again, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from swarm.client.local_swarm import LocalSwarm, free_port

EXAMPLES = """examples:
  swarm-demo
  swarm-demo --prompt "Once upon a time, there was a dragon" --max-new-tokens 80 --seed 3
  swarm-demo --keep          # leave the swarm and its dashboard running until Ctrl-C
"""


SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
"""The demo's default decoding (`--greedy` turns sampling off); tests check the swarm's story equals local
`generate` with these settings and the same seed."""


def generation_settings(greedy: bool) -> dict[str, object]:
    return {"do_sample": False} if greedy else dict(SAMPLING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-demo",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--port", type=int, help="registry port (default 7000 when free, else any free port)")
    parser.add_argument("--keep", action="store_true", help="keep the swarm running after generating")
    return parser


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    from swarm.default_model import default_model_path
    from swarm.runtime import quiet_optional_backends

    quiet_optional_backends()
    from swarm.models import ModelArchitecture

    model = default_model_path()
    num_layers = ModelArchitecture.of(model).num_layers
    half = num_layers // 2
    port = args.port or (7000 if _port_is_free(7000) else free_port())
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731 - stdout is for the story
    with (
        tempfile.TemporaryDirectory(prefix="swarm-demo-") as workdir,
        LocalSwarm(Path(workdir), registry_port=port) as swarm,
    ):
        try:
            swarm.start_registry()
            say(f"registry and dashboard: http://127.0.0.1:{port}/")
            swarm.start_node(model, f"0-{half - 1}", name="node-a")
            swarm.start_node(model, f"{half}-{num_layers - 1}", name="node-b")
            say(f"two nodes loading layers 0-{half - 1} and {half}-{num_layers - 1} of {model.name} ...")
            began = time.monotonic()
            swarm.wait_ready(model.name)
            say(f"all {num_layers} layers served after {time.monotonic() - began:.1f} s; generating:\n")
            _generate(model, swarm.registry_url, args)
            if args.keep:
                say(f"\nswarm running, dashboard at http://127.0.0.1:{port}/ - press Ctrl-C to stop")
                while all(process.alive() for process in swarm.processes):
                    time.sleep(1)
        except KeyboardInterrupt:
            say("\ninterrupted")
        finally:
            say("stopping the swarm ...")
    say("done")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """`kill` stops the demo as Ctrl-C does, and so the swarm it started: the swarm's processes run in sessions
    of their own, which a signal to the demo does not reach."""
    raise KeyboardInterrupt


def _generate(model: Path, registry: str, args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from swarm.client import DistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model)
    swarm_model = DistributedModelForCausalLM.from_pretrained(model, registry=registry)
    try:
        torch.manual_seed(args.seed)
        inputs = tokenizer(args.prompt, return_tensors="pt")
        print(args.prompt, end="", flush=True)
        swarm_model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            streamer=TextStreamer(tokenizer, skip_prompt=True),
            pad_token_id=tokenizer.pad_token_id,
            **generation_settings(args.greedy),
        )
    finally:
        swarm_model.close()


if __name__ == "__main__":
    sys.exit(main())
