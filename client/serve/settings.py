"""What the OpenAI-compatible gateway (`swarm-client serve`) is told beyond the client's own settings:
its flags, then `SWARM_GATEWAY_*` variables. Kept free of heavy imports: `--help` reads it."""

from __future__ import annotations

import argparse
from typing import Annotated

from pydantic import BeforeValidator, Field
from pydantic_settings import NoDecode, SettingsConfigDict

from swarm.settings import SwarmSettings


def parse_api_keys(value: str | list[str] | None) -> list[str]:
    """`--api-key a --api-key b,c` or `SWARM_GATEWAY_API_KEY=a,b,c` as a list of keys."""
    items = [] if value is None else [value] if isinstance(value, str) else value
    return [key.strip() for item in items for key in item.split(",") if key.strip()]


CommaList = Annotated[list[str], NoDecode, BeforeValidator(parse_api_keys)]
"""A flag that may repeat, or a variable of comma-separated items."""
ApiKeys = CommaList


class GatewaySettings(SwarmSettings):
    model_config = SettingsConfigDict(env_prefix="SWARM_GATEWAY_")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: ApiKeys = Field(default_factory=list, repr=False)
    max_concurrency: int = Field(8, ge=1, description="requests tokenizing or generating at once, shared fairly")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="larger request bodies get 413")
    max_batch_rows: int = Field(64, ge=1, description="prompts x choices per request; a node's --max-batch-size")
    key_max_concurrency: int | None = Field(None, ge=1, description="requests in flight per API key")
    key_requests_per_minute: int | None = Field(None, ge=1)
    key_tokens_per_minute: int | None = Field(None, ge=1, description="prompt + max_tokens, then what was used")
    speculate: int = Field(0, ge=0, le=64, description="drafted tokens a step for single requests")
    draft_model: str | None = Field(None, description="draft with this local model (`default`: the demo's)")
    tuned: CommaList = Field(default_factory=list, description="LABEL=FILE: serve a tuning file as model NAME:LABEL")

    def tunings(self) -> dict[str, str]:
        """`--tuned LABEL=FILE` (repeated, or comma-separated) as {label: file}."""
        served = {}
        for item in self.tuned:
            label, sep, path = item.partition("=")
            if not sep or not label or not path:
                raise ValueError(f"--tuned takes LABEL=FILE (e.g. my-prompt=my-prompt.safetensors), got {item!r}")
            served[label] = path
        return served


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    """`swarm-client serve`'s own flags, one per `GatewaySettings` field."""
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument(
        "--api-key",
        action="append",
        help="require `Authorization: Bearer KEY`; repeat it or separate keys by commas for several keys, "
        "each with limits of its own",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        help="requests tokenizing or generating at once (default 8); waiting ones are admitted round-robin by key",
    )
    parser.add_argument("--max-body-bytes", type=int, help="largest request body (default 4 MiB); larger get 413")
    parser.add_argument(
        "--max-batch-rows",
        type=int,
        help="prompts x choices (n, best_of, num_beams) in one request (default 64, a node's --max-batch-size)",
    )
    parser.add_argument("--key-max-concurrency", type=int, help="requests in flight per API key (default: no limit)")
    parser.add_argument(
        "--key-requests-per-minute", type=int, help="requests per minute per API key (default: no limit)"
    )
    parser.add_argument(
        "--speculate",
        type=int,
        metavar="N",
        help="draft up to N tokens a step from the text so far (prompt lookup) for greedy requests of one sequence "
        "without logprobs, checked by the swarm in one step: the same text in fewer round trips (default 0: off)",
    )
    parser.add_argument(
        "--draft-model",
        metavar="PATH",
        help="draft with this small local model instead of prompt lookup (same tokenizer as the model; `default`: "
        "the one shipped for the embedded demo model), up to 8 tokens a step unless --speculate says otherwise; "
        "sampled requests draft too (the same distribution, but a seed draws other tokens than without drafts)",
    )
    parser.add_argument(
        "--tuned",
        action="append",
        metavar="LABEL=FILE",
        help="also serve a file `swarm-client tune` wrote, as model NAME:LABEL (repeat for several); requests "
        "naming it run with its soft prompt and/or adapter",
    )
    parser.add_argument(
        "--key-tokens-per-minute",
        type=int,
        help="tokens per minute per API key: prompt plus max_tokens at admission, what was used once done "
        "(default: no limit)",
    )
