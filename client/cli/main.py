"""`swarm-client`: generate text through the swarm, chat, score, run batches, serve an OpenAI-compatible API,
and inspect what the swarm serves. This module is the command line; each command lives in its own module,
imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from swarm.client.core.settings import ClientSettings
from swarm.client.serve.settings import GatewaySettings, add_gateway_flags
from swarm.errors import SwarmError
from swarm.settings import SwarmSettings, environment_help

EXAMPLES = """examples:
  swarm-client status --wait-ready 60
  swarm-client generate "Once upon a time" --max-new-tokens 40
  swarm-client generate "Once upon a time" --model ./models/tiny-llama --registry ws://127.0.0.1:7000 --greedy
  swarm-client generate "The dragon" --temperature 0.8 --top-p 0.95 --seed 1
  swarm-client generate "Leo saw the cave. Leo" --greedy --speculate 8
  swarm-client generate "Once upon a time" --greedy --speculate 6 --draft-model default
  swarm-client chat --temperature 0.7
  swarm-client score stories.txt --choices "yes,no"
  swarm-client batch requests.jsonl results.jsonl --concurrency 4
  swarm-client tune docs/examples/named-zoe.jsonl --prompt-tokens 8 --steps 100 --out zoe.safetensors
  swarm-client generate "Once upon a time, there was a brave boy named" --soft-prompt zoe.safetensors
  swarm-client serve --port 8000 --api-key secret
  swarm-client status --json
"""
SERVE_EXAMPLES = """examples:
  swarm-client serve --model ./models/tiny-llama --registry ws://127.0.0.1:7000 --port 8000
  swarm-client serve --port 8000 --api-key secret --max-concurrency 16
  swarm-client serve --port 8000 --speculate 6 --draft-model default
  swarm-client serve --api-key alice-key --api-key bob-key --key-requests-per-minute 60 --key-tokens-per-minute 50000
  curl http://127.0.0.1:8000/v1/completions -H 'Authorization: Bearer secret' -H 'Content-Type: application/json' \\
       -d '{"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}'
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='secret'); \\
print(c.chat.completions.create(model='tiny-stories', messages=[{'role': 'user', 'content': 'Hi'}]))"
API docs (OpenAPI) at http://127.0.0.1:8000/docs
"""
CHAT_EXAMPLES = """examples:
  swarm-client chat
  swarm-client chat --model ./models/tiny-llama --registry ws://127.0.0.1:7000 --temperature 0.7 --max-new-tokens 60
  swarm-client chat --system "You are a terse assistant." --temperature 0
  swarm-client chat --draft-model default       # a small local model drafts, the swarm checks: fewer round trips
type /reset for a new conversation, /quit or Ctrl-D to leave
"""
SCORE_EXAMPLES = """examples:
  swarm-client score texts.txt                      # one text per line; JSON lines out
  swarm-client score texts.jsonl --batch-size 16    # JSONL with a "text" field
  swarm-client score questions.txt --choices "yes,no"
  echo "The cat sat on the mat" | swarm-client score -
"""
BATCH_EXAMPLES = """examples:
  echo '{"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "logprobs": 2}' > in.jsonl
  swarm-client batch in.jsonl out.jsonl
  swarm-client batch in.jsonl out.jsonl --concurrency 8 --model ./models/tiny-llama
rerun the same command after an interruption: lines already in OUT are kept, the rest run
"""


TUNE_EXAMPLES = """examples (docs/examples/named-zoe.jsonl: story openings whose hero is always named Zoe):
  swarm-client tune docs/examples/named-zoe.jsonl --prompt-tokens 8 --steps 100 --out zoe.safetensors
  swarm-client generate "Once upon a time, there was a brave boy named" --greedy --soft-prompt zoe.safetensors
  swarm-client tune docs/examples/named-zoe.jsonl --lora 4 --steps 60 --out zoe-lora.safetensors
  swarm-client serve --tuned zoe=zoe.safetensors     # also serves model "tiny-stories:zoe"
rerun the same tune command after an interruption: it resumes from the last save
"""


ESTIMATE_EXAMPLES = """examples:
  swarm-client estimate                                   # the embedded demo model
  swarm-client estimate ./models/llama-70b --memory 24GiB --cache-tokens 32768
  swarm-client estimate ./models/tiny-llama --json
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
    common.add_argument("--log-level", help="diagnostics on stderr (default WARNING)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--model",
        help="checkpoint folder (env SWARM_MODEL; default: the embedded demo model, "
        "or the only model the swarm serves)",
    )
    model.add_argument("--model-name", help="name in the swarm (default: last component of --model)")
    model.add_argument(
        "--models-dir", help="also look here for the checkpoint of the model the swarm serves (default: ./models, .)"
    )
    model.add_argument(
        "--compression",
        choices=["none", "int8-block"],
        help="int8-block: send hidden states as 8-bit blocks to nodes that support it "
        "(about 1/4 of float32's bytes, slightly inexact; default none)",
    )

    model.add_argument(
        "--no-forwarding",
        dest="forwarding",
        action="store_const",
        const=False,
        help="send every step through this client between two nodes, instead of node to node along the chain "
        "(forwarding: about one one-way trip per node instead of a round trip; on by default)",
    )
    model.add_argument(
        "--soft-prompt",
        metavar="FILE",
        help="run with the soft prompt learned by `swarm-client tune` (a .safetensors file it wrote)",
    )
    model.add_argument(
        "--adapter",
        metavar="FILE",
        help="run with the low-rank adapter learned by `swarm-client tune --lora` (the file it wrote)",
    )
    model.add_argument(
        "--verify-rate",
        type=float,
        metavar="FRACTION",
        help="fraction of steps other peers compute again to catch a lying peer, besides each new peer's first "
        "step (default 0.03; 0 turns checking off)",
    )

    settings_read: dict[str, tuple[type[SwarmSettings], ...]] = {}  # by command, for its --help

    def command(name: str, summary: str, examples: str, *settings: type[SwarmSettings]) -> argparse.ArgumentParser:
        settings_read[name] = (ClientSettings, *settings)
        return commands.add_parser(
            name,
            parents=[common, model],
            help=summary,
            epilog=examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    generate = command("generate", "continue a prompt, streaming to stdout", EXAMPLES)
    generate.add_argument("prompt", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=40)
    generate.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    generate.add_argument("--temperature", type=float, help="sampling temperature (implies sampling)")
    generate.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    generate.add_argument("--top-p", type=float, help="nucleus sampling probability mass")
    generate.add_argument("--seed", type=int, help="seed for reproducible sampling")
    _add_speculation(generate)

    _add_chat(command("chat", "talk with the model; the conversation stays in one swarm session", CHAT_EXAMPLES))
    _add_score(command("score", "log-likelihood of each line of a file (or of choices after it)", SCORE_EXAMPLES))
    _add_batch(command("batch", "run a JSONL file of OpenAI completions requests; resumable", BATCH_EXAMPLES))
    _add_tune(command("tune", "learn a soft prompt or a low-rank adapter through the swarm; resumable", TUNE_EXAMPLES))
    add_gateway_flags(
        command("serve", "serve an OpenAI-compatible HTTP API for the model", SERVE_EXAMPLES, GatewaySettings)
    )

    estimate = commands.add_parser(
        "estimate",
        parents=[common],
        help="memory a model needs and how many nodes cover it (reads headers only)",
        epilog=ESTIMATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    estimate.add_argument(
        "model", nargs="?", help="checkpoint folder (env SWARM_MODEL; default: the embedded demo model)"
    )
    estimate.add_argument("--memory", default="24GiB", help="memory of one node, e.g. 24GiB (default 24GiB)")
    estimate.add_argument("--cache-tokens", type=int, default=65536, help="KV cache per node in tokens (default 65536)")
    estimate.add_argument("--json", action="store_true", help="machine-readable output")

    status = commands.add_parser(
        "status",
        parents=[common],
        help="coverage of each model the swarm serves",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument("--model", dest="served_model", metavar="NAME", help="only this model (its swarm name)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--wait-ready", type=float, metavar="SECONDS", help="wait until every layer is served; exit code 1 on timeout"
    )
    parser.epilog = EXAMPLES + "\n" + environment_help(generate, ClientSettings)
    for name, subcommand in commands.choices.items():
        variables = environment_help(subcommand, *settings_read.get(name, (ClientSettings,)))
        subcommand.epilog = (subcommand.epilog or "") + "\n" + variables
    return parser


def _add_speculation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speculate",
        type=int,
        metavar="N",
        help="draft up to N tokens a step from the text so far (prompt lookup) and let the swarm check them in one "
        "step: fewer round trips on repetitive text, the same output (greedy) or distribution (sampling)",
    )
    parser.add_argument(
        "--draft-model",
        metavar="PATH",
        help="draft with this small local model instead (same tokenizer as the model; `default`: the one shipped "
        "for the embedded demo model), up to 8 tokens a step unless --speculate says otherwise",
    )


def _add_chat(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=200, help="longest reply in tokens (default 200)")
    parser.add_argument(
        "--max-length", type=int, default=2048, help="tokens the session holds, all turns together (default 2048)"
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="0 picks the likeliest token (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling probability mass (default 0.95)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: all)")
    parser.add_argument("--seed", type=int, help="seed for reproducible sampling")
    parser.add_argument("--system", help="system message that opens every conversation")
    _add_speculation(parser)


def _add_score(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="text file (one text per line) or JSONL with a 'text' field; - for stdin")
    parser.add_argument("--choices", help="comma-separated continuations to score after each line, e.g. 'yes,no'")
    parser.add_argument("--separator", default=" ", help="put between a line and each choice (default: a space)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per pass through the swarm (default 8)")


def _add_tune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help='JSONL: one {"prompt": ..., "completion": ...} per line (loss on completions)')
    parser.add_argument("--out", required=True, help="safetensors file to write (and to resume from)")
    parser.add_argument("--prompt-tokens", type=int, metavar="N", help="learn a soft prompt of N tokens")
    parser.add_argument("--init-text", help="start the soft prompt from this text's token embeddings (repeated)")
    parser.add_argument("--lora", type=int, metavar="RANK", help="learn a low-rank adapter of this rank")
    parser.add_argument("--lora-alpha", type=float, help="the adapter's scale numerator (default: its rank)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in all (default 100)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step (default 4)")
    parser.add_argument(
        "--learning-rate",
        type=float,
        help="AdamW's learning rate (default 0.1 for a soft prompt alone, 0.003 with --lora)",
    )
    parser.add_argument("--max-tokens", type=int, default=256, help="longest example in tokens (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="initialization and example order (default 0)")
    parser.add_argument("--save-every", type=int, default=10, help="save (and so resume from) every N steps")
    parser.add_argument("--restart", action="store_true", help="start over even if --out holds a run to resume")


def _add_batch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="JSONL: one OpenAI completions request per line")
    parser.add_argument("output", help="JSONL results, one per input line; kept and resumed across runs")
    parser.add_argument("--concurrency", type=int, default=4, help="requests running at once (default 4)")


Command = Callable[[argparse.Namespace, ClientSettings], int]
COMMANDS: dict[str, str] = {
    "generate": "swarm.client.cli.generate",
    "status": "swarm.client.cli.status",
    "estimate": "swarm.client.cli.estimate",
    "chat": "swarm.client.cli.chat",
    "score": "swarm.client.cli.score",
    "batch": "swarm.client.cli.batch",
    "tune": "swarm.client.cli.tune",
    "serve": "swarm.client.serve.gateway",
}
"""The module whose `run(args, settings)` is each command, imported only when it runs (they load torch,
transformers, FastAPI, rich)."""


def _command(name: str) -> Command:
    return importlib.import_module(COMMANDS[name]).run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = ClientSettings.from_flags(args)
        from swarm.runtime import setup_logging

        setup_logging(settings.log_level)
        return _command(args.command)(args, settings)
    except (SwarmError, ValueError) as exc:
        print(f"swarm-client: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
