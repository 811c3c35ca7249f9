"""`swarm-registry`: parse the command line and start the registry (`swarm.registry.server`).

Kept apart from the server so that `--help` answers without loading it."""

from __future__ import annotations

import argparse
import sys

from swarm.registry.settings import RegistrySettings
from swarm.settings import environment_help

EXAMPLES = """examples:
  swarm-registry                       # ws://127.0.0.1:7000, dashboard at http://127.0.0.1:7000/
  swarm-registry --host 0.0.0.0 --port 7000 --token s3cret
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-registry",
        description="Track which peers serve which layers, answer route queries, serve the dashboard.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port; 0 picks a free one (default 7000)")
    parser.add_argument("--token", help="shared secret of a private swarm (env SWARM_TOKEN)")
    parser.add_argument("--tls-cert", help="serve wss:// (and https:// for the dashboard) with this PEM certificate")
    parser.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument("--max-peers", type=int, help="peers kept, live or gone; beyond it announces get busy")
    parser.add_argument("--max-models", type=int, help="models served at once; a new one beyond it gets busy")
    parser.add_argument(
        "--reports-to-exclude",
        type=int,
        metavar="N",
        help="clients at distinct addresses that must report a peer as lying before queries leave it out (default 3)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        metavar="SECONDS",
        help="after a start, answers say the view may be incomplete this long; clients ask other registries first "
        "(default 10: two heartbeats of the nodes' default interval)",
    )
    parser.epilog = EXAMPLES + "\n" + environment_help(parser, RegistrySettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = RegistrySettings.from_flags(args)
    except ValueError as exc:
        print(f"swarm-registry: error: {exc}", file=sys.stderr)
        return 2
    from swarm.registry.server import serve
    from swarm.runtime import run, setup_logging
    from swarm.transport import server_ssl_context

    setup_logging(settings.log_level)
    tls = server_ssl_context(settings.tls_cert, settings.tls_key)
    try:
        run(serve(settings, tls))
    except OSError as exc:
        print(f"swarm-registry: error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
