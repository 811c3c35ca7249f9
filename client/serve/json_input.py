"""How the gateway reads a request body: strict types, as its JSON schema states them, so that what the OpenAPI
schema allows is exactly what is accepted (a fuzzer checks both ways).

- No coercion: `0` is no boolean, `false` no integer, `"2"` no number (`JsonRequest` is strict).
- An integer may be written `2.0`, as JSON schema's integers include it (`WHOLE`).
- A string with a lone surrogate escape (`"\\ud800"`, valid JSON but no Unicode text) has it replaced by U+FFFD,
  instead of failing deep inside a tokenizer.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


WHOLE = BeforeValidator(_whole_number)
Integer = Annotated[int, WHOLE]
"""A request's integer. An optional one carries its bounds inside, `Annotated[int, Field(ge=0), WHOLE] | None`:
given on the outer `Field`, pydantic's schema loses them."""


_SURROGATE = re.compile("[\ud800-\udfff]")
"""JSON decoding joins valid surrogate pairs into one character: any surrogate left in a string is alone."""


def valid_unicode(value: Any) -> Any:
    """`value` with every string in it made valid Unicode (lone surrogates become U+FFFD)."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {valid_unicode(key): valid_unicode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [valid_unicode(item) for item in value]
    return value


class JsonRequest(BaseModel):
    """Base of every request body: strict, unknown fields refused, text made valid Unicode."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return valid_unicode(data)


def null_means_default(schema: dict[str, Any]) -> None:
    """`json_schema_extra` of a request whose optional fields also take `null` (OpenAI's clients send it for
    "unset", and the model turns it into the default): says so in the schema."""
    required = set(schema.get("required", []))
    for name, field in schema.get("properties", {}).items():
        variants = field.get("anyOf", [field])
        if name in required or {"type": "null"} in variants:
            continue
        described = {key: field.pop(key) for key in ("title", "description", "default") if key in field}
        inner = dict(field)
        field.clear()
        field.update(anyOf=[inner, {"type": "null"}], **described)
