"""How every swarm process is configured: one pydantic-settings model per process, filled from its flags,
then `SWARM_*` environment variables, then defaults.

Variables that mean the same thing to every process keep one name (`SWARM_REGISTRY`, `SWARM_TOKEN`,
`SWARM_TLS_CA`, `SWARM_MODEL`, `SWARM_LOG_LEVEL`); the rest carry the process's own prefix
(`SWARM_NODE_PORT`, `SWARM_REGISTRY_PORT`, `SWARM_GATEWAY_PORT`), so one shell can start them all. Each
`--help` lists the variables its process reads (`environment_help`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_REGISTRY = "ws://127.0.0.1:7000"


def parse_registries(value: str | list[str] | None) -> list[str]:
    """`ws://a:7000,ws://b:7000` (a flag, `SWARM_REGISTRY`, or a list) as a list; None is the local default."""
    items = [DEFAULT_REGISTRY] if value is None else value if isinstance(value, list) else value.split(",")
    urls = [item.strip() for item in items if item.strip()]
    for url in urls:
        if not re.match(r"^wss?://[^/\s]+", url):
            raise ValueError(f"registry address {url!r} must look like ws://HOST:PORT or wss://HOST:PORT")
    return urls


Registries = Annotated[list[str], NoDecode, BeforeValidator(parse_registries)]
"""A registry list setting: comma-separated in the environment, validated like the flag."""


def shared(variable: str, default: Any = None, **field: Any) -> Any:
    """A setting every process reads from the same variable, e.g. `shared("SWARM_TOKEN")`."""
    return Field(default, validation_alias=variable, **field)


class SwarmSettings(BaseSettings):
    """Base of every process's settings. Subclasses set `env_prefix` to their own `SWARM_<PROCESS>_`."""

    model_config = SettingsConfigDict(
        env_prefix="SWARM_", extra="forbid", validate_by_name=True, validate_by_alias=True
    )

    @classmethod
    def from_flags(cls, flags: Mapping[str, object] | argparse.Namespace) -> Self:
        """Settings from parsed flags: a flag given wins over the environment, an absent one (None) defers."""
        values = vars(flags) if isinstance(flags, argparse.Namespace) else flags
        return cls(**{name: value for name, value in values.items() if value is not None and name in cls.model_fields})

    @classmethod
    def environment_variable(cls, name: str) -> str:
        alias = cls.model_fields[name].validation_alias
        return alias if isinstance(alias, str) else f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def environment_help(parser: argparse.ArgumentParser, *settings: type[SwarmSettings]) -> str:
    """The `--help` section naming each variable of `settings` that `parser`'s command reads, next to the flag
    (or argument) that overrides it."""
    flags = {action.dest: "/".join(action.option_strings) or action.dest.upper() for action in parser._actions}
    rows = []
    for model in settings:
        for name, field in model.model_fields.items():
            if name in flags:
                hint = flags[name] + (" (true or false)" if field.annotation is bool else "")
                rows.append((model.environment_variable(name), hint))
    width = max(len(variable) for variable, _ in rows) + 2
    lines = [f"  {variable:<{width}}{hint}" for variable, hint in rows]
    return "environment (a flag given on the command line wins):\n" + "\n".join(lines) + "\n"


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
