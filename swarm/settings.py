"""Pieces of configuration every process shares: registry lists, the private-swarm token, layer ranges."""

from __future__ import annotations

import os
import re

DEFAULT_REGISTRY = "ws://127.0.0.1:7000"
ENV_PREFIX = "SWARM_"


def parse_registries(value: str | list[str] | None) -> list[str]:
    """`ws://a:7000,ws://b:7000` (or `SWARM_REGISTRY`, else the local default) as a list."""
    if value is None:
        value = os.environ.get("SWARM_REGISTRY") or DEFAULT_REGISTRY
    items = value if isinstance(value, list) else value.split(",")
    urls = [item.strip() for item in items if item.strip()]
    for url in urls:
        if not re.match(r"^wss?://[^/\s]+", url):
            raise ValueError(f"registry address {url!r} must look like ws://HOST:PORT or wss://HOST:PORT")
    return urls


def parse_layer_range(text: str) -> tuple[int, int]:
    """Inclusive `A-B` (or a single `A`) as the half-open [A, B+1) used everywhere inside swarm."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[-:]\s*(\d+)\s*)?", text)
    if not match:
        raise ValueError(f"layer range {text!r} must look like 0-9 (inclusive) or a single index")
    start = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else start
    if last < start:
        raise ValueError(f"layer range {text!r} ends before it starts")
    return start, last + 1
