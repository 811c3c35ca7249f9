"""Process-level setup every swarm command shares: event loop policy and logging."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop where it is installed; asyncio's own loop works too, only slower."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every platform
        return asyncio.run(main)
    return uvloop.run(main)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def quiet_optional_backends() -> None:
    """torchao (installed for `--quantize int8`) is imported by `transformers`; on import it logs a warning for
    each GPU kernel library this machine cannot load and for each enum it registers with torch.compile.
    Neither matters to a swarm process, and they would bury the output of every command."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def setup_logging(level: str = "INFO") -> None:
    """Diagnostics go to stderr so stdout stays clean for generated text and JSON."""
    quiet_optional_backends()
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("websockets", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
