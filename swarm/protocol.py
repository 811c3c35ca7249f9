"""The wire contract between clients, nodes and registries (documented in docs/protocol.md).

Every frame is one binary websocket message holding a msgpack map; the map's `type` field names
one of the pydantic models below. Tensors travel as raw little-endian bytes with their dtype and
shape (or, for hidden states, optionally 8-bit compressed), never pickled. Decoding validates
everything, so code past `decode_message` can trust types and tensor sizes (semantic checks such as
"does this shape fit the session" stay with the node).

Fields added to version 1 after its release (`WireTensor.codec`/`scales`, `PeerInfo.codecs`) are
optional: frames without them stay valid, and they are left out of a frame while they hold their
default, so such frames are byte-for-byte what older peers send. Older peers refuse frames that carry
them (extra fields are refused), which includes the `PeerInfo` of any node that advertises a codec.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Annotated, ClassVar, Literal, Self, Union

import msgpack
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from swarm import compression
from swarm.errors import ProtocolError

PROTOCOL_VERSION = 2
"""The newest version this code speaks, sent in `hello`; bumped whenever a peer of the previous one would not
understand a frame. Version 2 adds `step_group`; everything else is as in version 1."""

SUPPORTED_VERSIONS = (1, 2)
"""Versions a server accepts in `hello` (its `welcome` answers with the same one); other versions are refused
with `bad_request`, and a client then tries the next older one."""

ERROR_CODES = ("bad_request", "unknown_session", "busy", "unauthorized", "too_large", "internal")
ErrorCode = Literal["bad_request", "unknown_session", "busy", "unauthorized", "too_large", "internal"]

PeerState = Literal["joining", "online", "draining"]

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}
WireDType = Literal["float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"]
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")

CODECS = ("raw", "int8-block")
"""Tensor encodings every node decodes (and advertises in `PeerInfo.codecs`)."""
Codec = Literal["raw", "int8-block"]

Id = Annotated[str, Field(min_length=1, max_length=128)]
LayerIndex = Annotated[int, Field(ge=0, le=100_000)]
Count = Annotated[int, Field(ge=0, le=2**40)]

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("swarm's wire format assumes a little-endian host")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    omitted_when_default: ClassVar[frozenset[str]] = frozenset()
    """Fields added after v1 shipped: left out of frames at their default, so older peers still accept them."""

    @classmethod
    def trusted(cls, **values: object) -> Self:
        """`model_construct` for values this process built itself (so already valid), at a fifth of its cost:
        the hot path builds several messages and tensors per token. Fields not given take their defaults."""
        message = cls.__new__(cls)
        object.__setattr__(message, "__dict__", {**_defaults(cls), **values})
        object.__setattr__(message, "__pydantic_fields_set__", set(values))
        object.__setattr__(message, "__pydantic_extra__", None)
        object.__setattr__(message, "__pydantic_private__", None)
        return message


class WireTensor(_Strict):
    """A tensor as `{dtype, shape, data}`, plus `{codec, scales}` when compressed.

    `raw` (the default, `codec` then omitted): `data` holds exactly prod(shape) * itemsize bytes.
    `int8-block` (floating dtypes, at least one dimension): the last dimension is cut into blocks of 64
    values (a row's last block may be shorter); `data` holds one int8 per value, `q = round(x / s * 127)`,
    in row-major order, and `scales` one float32 `s` (the block's absmax) per block, row by row. Decoding
    gives `q * s / 127` in `dtype`; a NaN scale marks a block that held non-finite values.
    """

    omitted_when_default = frozenset({"codec", "scales"})

    dtype: WireDType
    shape: Annotated[list[Annotated[int, Field(ge=0, le=2**31)]], Field(max_length=4)]
    data: bytes
    codec: Codec = "raw"
    scales: bytes | None = None

    @model_validator(mode="after")
    def _data_matches_shape(self) -> WireTensor:
        if self.codec == "raw":
            if self.scales is not None:
                raise ValueError("a raw tensor carries no scales")
            expected = math.prod(self.shape) * WIRE_DTYPES[self.dtype].itemsize
            _check_length("data", self.data, expected, self)
            return self
        if self.dtype not in FLOAT_DTYPE_NAMES or not self.shape:
            raise ValueError(f"{self.codec} encodes floating tensors of at least one dimension, not {self.dtype}")
        data_bytes, scale_bytes = compression.encoded_sizes(self.shape)
        _check_length("data", self.data, data_bytes, self)
        _check_length("scales", self.scales or b"", scale_bytes, self)
        return self

    @classmethod
    def from_torch(cls, tensor: torch.Tensor, codec: Codec = "raw") -> WireTensor:
        """`tensor` as it travels: bit-exact (`raw`), or 8-bit blocks that decode to its dtype (`int8-block`)."""
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"dtype {tensor.dtype} cannot travel on the wire")
        name = DTYPE_NAMES[tensor.dtype]
        if codec == "int8-block":
            if name not in FLOAT_DTYPE_NAMES or tensor.dim() == 0:
                raise TypeError(f"int8-block encodes floating tensors of at least one dimension, not {tensor.dtype}")
            data, scales = compression.quantize(tensor)
            return cls.trusted(dtype=name, shape=list(tensor.shape), data=data, codec=codec, scales=scales)
        raw = tensor.view(torch.uint8) if tensor.dtype != torch.bool and tensor.numel() else tensor
        data = raw.numpy().tobytes() if tensor.numel() else b""
        return cls.trusted(dtype=name, shape=list(tensor.shape), data=data)

    def to_torch(self) -> torch.Tensor:
        dtype = WIRE_DTYPES[self.dtype]
        if self.codec == "int8-block":
            return compression.dequantize(self.data, self.scales or b"", self.shape, dtype)
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=dtype).reshape(self.shape)


def _check_length(field: str, value: bytes, expected: int, tensor: WireTensor) -> None:
    if len(value) != expected:
        raise ValueError(
            f"tensor {field} has {len(value)} bytes, {tensor.codec} shape {tensor.shape} of {tensor.dtype} "
            f"needs {expected}"
        )


class PeerInfo(_Strict):
    """What a node tells registries about itself; the unit of the swarm's soft state."""

    peer_id: Id
    address: Annotated[str, Field(min_length=1, max_length=512)]
    model: Id
    num_layers: Annotated[int, Field(ge=1, le=100_000)]
    start: LayerIndex
    end: LayerIndex
    state: PeerState
    dtype: WireDType
    throughput: Annotated[float, Field(ge=0)] = Field(description="decode steps per second through one layer")
    cache_tokens_free: Count
    cache_tokens_total: Count
    sessions: Count = 0
    version: Annotated[str, Field(max_length=64)] = ""
    codecs: Annotated[list[Annotated[str, Field(max_length=32)]], Field(max_length=16)] = ["raw"]
    """Tensor codecs the node decodes; names this version does not know are allowed and ignored."""

    omitted_when_default = frozenset({"codecs"})

    @model_validator(mode="after")
    def _span_is_valid(self) -> PeerInfo:
        if not self.start < self.end <= self.num_layers:
            raise ValueError(f"span [{self.start}, {self.end}) is not inside 0..{self.num_layers}")
        return self


class Hello(_Strict):
    """First frame on every connection: protocol version and, in a private swarm, the token."""

    type: Literal["hello"] = "hello"
    version: int
    token: Annotated[str, Field(max_length=1024)] | None = None
    agent: Annotated[str, Field(max_length=128)] = ""


class NodeLimits(_Strict):
    """What a node accepts, so a client can size its frames and sessions before sending them."""

    max_message_bytes: Count
    max_batch_size: Count
    max_length: Count
    hidden_size: Count


class Welcome(_Strict):
    """Answer to `hello`; nodes add their identity and limits, registries send `node=None`."""

    type: Literal["welcome"] = "welcome"
    version: int
    node: PeerInfo | None = None
    limits: NodeLimits | None = None


class Announce(_Strict):
    """Node -> registry, sent at start and then as the heartbeat; `ttl` is when to forget it."""

    type: Literal["announce"] = "announce"
    peer: PeerInfo
    ttl: Annotated[float, Field(gt=0, le=3600)]


class Leave(_Strict):
    type: Literal["leave"] = "leave"
    peer_id: Id


class Ack(_Strict):
    type: Literal["ack"] = "ack"


class Query(_Strict):
    """Client -> registry: the live peers of one model (or of all models when `model` is None)."""

    type: Literal["query"] = "query"
    model: Id | None = None


class SwarmView(_Strict):
    type: Literal["swarm_view"] = "swarm_view"
    peers: list[PeerInfo]


class OpenSession(_Strict):
    """Reserve a KV cache for layers [start, end) of this node for `batch_size` x `max_length` tokens."""

    type: Literal["open_session"] = "open_session"
    session_id: Id
    start: LayerIndex
    end: LayerIndex
    max_length: Annotated[int, Field(ge=1, le=2**24)]
    batch_size: Annotated[int, Field(ge=1, le=2**16)]


class SessionOpened(_Strict):
    type: Literal["session_opened"] = "session_opened"
    session_id: Id


class Step(_Strict):
    """New positions of one session: hidden [B, T, H], position_ids [B, T], attention_mask [B, T].

    `hypo_ids` [B], when given, reorders the session's cache rows before the step (beam search).
    """

    type: Literal["step"] = "step"
    session_id: Id
    step_id: Count
    hidden: WireTensor
    position_ids: WireTensor
    attention_mask: WireTensor | None = None
    hypo_ids: WireTensor | None = None


class StepResult(_Strict):
    type: Literal["step_result"] = "step_result"
    session_id: Id
    step_id: Count
    hidden: WireTensor


class CloseSession(_Strict):
    type: Literal["close_session"] = "close_session"
    session_id: Id


class SessionClosed(_Strict):
    type: Literal["session_closed"] = "session_closed"
    session_id: Id


class Forward(_Strict):
    """A stateless pass over layers [start, end): no cache is kept, `attention_mask` covers all T."""

    type: Literal["forward"] = "forward"
    start: LayerIndex
    end: LayerIndex
    hidden: WireTensor
    position_ids: WireTensor
    attention_mask: WireTensor | None = None


class ForwardResult(_Strict):
    type: Literal["forward_result"] = "forward_result"
    hidden: WireTensor


class Error(_Strict):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: Annotated[str, Field(max_length=4096)]
    session_id: Id | None = None


MAX_STEPS_PER_FRAME = 1024

SessionIds = Annotated[list[Id], Field(min_length=1, max_length=MAX_STEPS_PER_FRAME)]


class StepMany(_Strict):
    """Steps of several sessions opened on this connection, in one frame: the node validates each on its
    own and runs them as one round (a client's concurrent sessions; see client/channel.py)."""

    type: Literal["step_many"] = "step_many"
    steps: Annotated[list[Step], Field(min_length=1, max_length=MAX_STEPS_PER_FRAME)]

    @model_validator(mode="after")
    def _one_step_per_session(self) -> StepMany:
        _check_once_each([step.session_id for step in self.steps])
        return self


class StepManyResult(_Strict):
    """One entry per step of a `StepMany`, in its order: its result, or the error that ended that step only."""

    type: Literal["step_many_result"] = "step_many_result"
    results: list[Annotated[StepResult | Error, Field(discriminator="type")]]


class StepGroup(_Strict):
    """One new position for each of several sessions opened on this connection, their rows stacked in one tensor
    each (version 2): hidden [R, 1, H], position_ids [R, 1], attention_mask [R, 1], where session i owns the
    `rows[i]` rows after those of the sessions before it and R is the sum of `rows`.

    The sessions of a client's concurrent generations decode in lockstep; as a group they cost one tensor to
    encode, decode and validate instead of one per session, and the node runs them as one batched forward."""

    type: Literal["step_group"] = "step_group"
    session_ids: SessionIds
    step_ids: Annotated[list[Count], Field(min_length=1, max_length=MAX_STEPS_PER_FRAME)]
    rows: Annotated[list[Annotated[int, Field(ge=1, le=2**16)]], Field(min_length=1, max_length=MAX_STEPS_PER_FRAME)]
    hidden: WireTensor
    position_ids: WireTensor
    attention_mask: WireTensor | None = None

    @model_validator(mode="after")
    def _one_entry_per_session(self) -> StepGroup:
        if not len(self.session_ids) == len(self.step_ids) == len(self.rows):
            raise ValueError("session_ids, step_ids and rows must have one entry per session")
        _check_once_each(self.session_ids)
        return self


class StepGroupResult(_Strict):
    """The answer to a `StepGroup`: hidden [R, 1, H] in the request's codec, rows in the request's order, and
    per session either None or the error that ended that session's step (its rows are then zeros)."""

    type: Literal["step_group_result"] = "step_group_result"
    hidden: WireTensor
    errors: list[Error | None]


def _check_once_each(session_ids: list[str]) -> None:
    if len(set(session_ids)) != len(session_ids):
        raise ValueError("a session may appear only once per frame (its next step needs this one's result)")


Message = Annotated[
    Union[
        Hello,
        Welcome,
        Announce,
        Leave,
        Ack,
        Query,
        SwarmView,
        OpenSession,
        SessionOpened,
        Step,
        StepResult,
        StepMany,
        StepManyResult,
        StepGroup,
        StepGroupResult,
        CloseSession,
        SessionClosed,
        Forward,
        ForwardResult,
        Error,
    ],
    Field(discriminator="type"),
]
_MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def encode_message(message: BaseModel) -> bytes:
    """One frame's bytes; messages built with `trusted` skip re-validation on the hot path."""
    return msgpack.packb(_to_plain(message), use_bin_type=True)


_ALWAYS = object()


def _to_plain(value: object) -> object:
    if isinstance(value, BaseModel):
        fields, plain = value.__dict__, {}
        for name, omitted_default in _wire_fields(type(value)):
            item = fields[name]
            if omitted_default is _ALWAYS or item != omitted_default:
                plain[name] = _to_plain(item) if isinstance(item, _NESTED) else item
        return plain
    if isinstance(value, list):
        return [_to_plain(item) if isinstance(item, _NESTED) else item for item in value]
    return value


_NESTED = (BaseModel, list)


@functools.cache
def _wire_fields(model: type[BaseModel]) -> tuple[tuple[str, object], ...]:
    """A model's fields in order, each with the default at which it is left out of frames (or `_ALWAYS`)."""
    omitted: frozenset[str] = getattr(model, "omitted_when_default", frozenset())
    return tuple((name, field.default if name in omitted else _ALWAYS) for name, field in model.model_fields.items())


@functools.cache
def _defaults(model: type[BaseModel]) -> dict[str, object]:
    """The defaults `trusted` fills in; every wire model's defaults are immutable or None (no factories)."""
    if any(field.default_factory is not None for field in model.model_fields.values()):
        raise TypeError(f"{model.__name__} has a default factory, which trusted() does not run")
    return {name: field.default for name, field in model.model_fields.items() if not field.is_required()}


def decode_message(frame: bytes | str, max_bytes: int | None = None) -> Message:
    """Parse and validate one frame, or raise `ProtocolError` with the code to answer with."""
    if isinstance(frame, str):
        raise ProtocolError("bad_request", "text frames are not part of the protocol; send binary msgpack")
    if max_bytes is not None and len(frame) > max_bytes:
        raise ProtocolError("too_large", f"frame of {len(frame)} bytes exceeds the limit of {max_bytes}")
    try:
        payload = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types on garbage
        raise ProtocolError("bad_request", f"frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
        raise ProtocolError("bad_request", "a frame must be a msgpack map with a string 'type' field")
    try:
        return _MESSAGE_ADAPTER.validate_python(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ProtocolError("bad_request", f"invalid {payload['type']!r} message at {where}: {first['msg']}") from None
