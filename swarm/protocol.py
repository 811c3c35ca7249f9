"""The wire contract between clients, nodes and registries (documented in docs/protocol.md).

Every frame is one binary websocket message holding a msgpack map; the map's `type` field names
one of the pydantic models below. Tensors travel as raw little-endian bytes with their dtype and
shape (or, for hidden states, optionally 8-bit compressed), never pickled. Decoding validates
everything, so code past `decode_message` can trust types and tensor sizes (semantic checks such as
"does this shape fit the session" stay with the node).

Optional fields are left out of a frame while they hold their default (`omitted_when_default`), so a
frame carries only what it says.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, Self, Union

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from swarm import compression
from swarm.dtypes import FLOAT_DTYPE_NAMES
from swarm.errors import ErrorCode, ProtocolError

if TYPE_CHECKING:  # tensors are converted in `swarm.tensors`: a process that never touches one never loads torch
    import torch

PROTOCOL_VERSION = 6
"""The version this code speaks, sent in `hello`; bumped whenever a peer of the previous one would not understand a
frame. Version 6 adds `PeerInfo.latencies_ms`, the round trips a node measured to the peers that may follow it in a
chain, full listings by page (`Query.after`, `Query.limit`, `SwarmView.more`) and queries by address
(`Query.address`). Version 5 added training: `backward`, low-rank adapters for a session or a pass
(`OpenSession.adapter`, `Forward.adapter`) and `PeerInfo.training`; `Step.lengths`, which rolls a session back
(speculative decoding); node-to-node forwarding (`Step.relay`, `Step.relay_key`, `OpenSession.relay_key`,
`StepResult.relay_error`); and bounded route queries (`Query.per_layer`, `cache_tokens`, `exclude`) with
`SwarmView.warming`. Version 4 added what a span is (`PeerInfo.model_id`, `weights`, `quantization`), route queries
by model identity, and `report` of a peer caught lying. Version 3 has one step message for one or many sessions,
matched to its reply by `step_id`; versions 1 and 2 had `step`, `step_many` and `step_group`."""

SUPPORTED_VERSIONS = (6,)
"""Versions a server accepts in `hello` (its `welcome` answers with the same one); other versions are refused
with `unsupported_version`, and a client then tries the next older one it speaks."""


PeerState = Literal["joining", "online", "draining"]

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}
"""Bytes per value of each wire dtype (`swarm.tensors.WIRE_DTYPES` maps the names to torch's dtypes)."""
WireDType = Literal["float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"]

CODECS = ("raw", "int8-block")
"""Tensor encodings every node decodes (and advertises in `PeerInfo.codecs`)."""
Codec = Literal["raw", "int8-block"]

Id = Annotated[str, Field(min_length=1, max_length=128)]
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
"""No control characters or line separators: what registries log and dashboards show cannot forge a line."""
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=PRINTABLE)]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
"""128 bits as 32 lowercase hex digits (`swarm.identity`)."""
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
            expected = math.prod(self.shape) * ITEMSIZE[self.dtype]
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
        from swarm import tensors

        return cls.trusted(**tensors.encode(tensor, codec))

    def to_torch(self) -> torch.Tensor:
        from swarm import tensors

        return tensors.decode(self)


def _check_length(field: str, value: bytes, expected: int, tensor: WireTensor) -> None:
    if len(value) != expected:
        raise ValueError(
            f"tensor {field} has {len(value)} bytes, {tensor.codec} shape {tensor.shape} of {tensor.dtype} "
            f"needs {expected}"
        )


MAX_LATENCIES = 16
"""Most peers a node announces round trips to (`PeerInfo.latencies_ms`)."""
Milliseconds = Annotated[float, Field(ge=0, le=600_000, allow_inf_nan=False)]


class PeerInfo(_Strict):
    """What a node tells registries about itself; the unit of the swarm's soft state."""

    peer_id: Name
    address: Annotated[str, Field(min_length=1, max_length=512, pattern=PRINTABLE)]
    model: Name
    num_layers: Annotated[int, Field(ge=1, le=4096)]
    start: LayerIndex
    end: LayerIndex
    state: PeerState
    dtype: WireDType
    throughput: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)] = Field(
        description="decode steps per second through one layer"
    )
    cache_tokens_free: Count
    cache_tokens_total: Count
    sessions: Count = 0
    version: Annotated[str, Field(max_length=64, pattern=PRINTABLE)] = ""
    codecs: Annotated[list[Annotated[str, Field(max_length=32, pattern=PRINTABLE)]], Field(max_length=16)] = ["raw"]
    """Tensor codecs the node decodes; names this version does not know are allowed and ignored."""
    model_id: Digest | None = None
    """The checkpoint's architecture: config and every tensor's name, dtype and shape (`swarm.identity`)."""
    weights: Digest | None = None
    """The bytes of the span's tensors as the node read them from the checkpoint (`swarm.identity`)."""
    quantization: Annotated[str, Field(max_length=32)] | None = None
    """How the node stores the span's weights beyond `dtype` (e.g. `int8`), or None."""
    training: bool = True
    """Whether the node answers `backward` (an operator may refuse training: `--no-training`)."""
    latencies_ms: Annotated[dict[Name, Milliseconds], Field(max_length=MAX_LATENCIES)] = {}
    """Round trips in milliseconds this node measured to peers that may come after it in a chain, by `peer_id`:
    what a forwarded step waits between the two (`swarm.routing.plan_route`)."""

    omitted_when_default = frozenset({"codecs", "model_id", "weights", "quantization", "training", "latencies_ms"})

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
    peer_id: Name


class Ack(_Strict):
    type: Literal["ack"] = "ack"


MAX_PER_LAYER = 16
"""Peers per layer a bounded route query may ask for."""
MAX_EXCLUDED = 1024
MAX_PAGE_PEERS = 1000
"""Most peers one page of a full listing holds (`Query.limit`): about 260 KB, whatever the swarm's size."""
"""Peer ids a route query may leave out."""


class Query(_Strict):
    """Client -> registry: the live peers of one model (or of all models when `model` is None); with `model_id`,
    only the peers serving that checkpoint (`PeerInfo.model_id`).

    A route query sets `per_layer`: then only online peers come back, for each layer the `per_layer` best by the
    planner's cost per layer of their whole span (`swarm.routing.span_rank`), those with `cache_tokens` free
    first, leaving out `exclude` (peers the client will not use: banned, other weights). The reply's size does not
    grow with the swarm's.

    Without `per_layer` the live peers come back a page at a time, by `peer_id`: at most `limit` (at most
    `MAX_PAGE_PEERS`, the default) of those whose id sorts after `after`; `SwarmView.more` says whether others
    follow (ask again with `after` set to the page's last id).

    With `address`, only the live peers that announce that address come back (a node checking where it may
    forward a step)."""

    type: Literal["query"] = "query"
    model: Name | None = None
    model_id: Digest | None = None
    per_layer: Annotated[int, Field(ge=1, le=MAX_PER_LAYER)] | None = None
    cache_tokens: Count = 0
    exclude: Annotated[list[Name], Field(max_length=MAX_EXCLUDED)] = []
    after: Name | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE_PEERS)] = MAX_PAGE_PEERS
    address: Annotated[str, Field(min_length=1, max_length=512, pattern=PRINTABLE)] | None = None

    omitted_when_default = frozenset({"model_id", "per_layer", "cache_tokens", "exclude", "after", "limit", "address"})


class Report(_Strict):
    """Client -> registry: `peer_id` answered a step with hidden states that two other peers contradicted.
    Registries stop routing to a peer after reports from several independent clients."""

    type: Literal["report"] = "report"
    peer_id: Name
    reason: Annotated[str, Field(max_length=512)]


class SwarmView(_Strict):
    """The answer to `query`. `warming`: the registry started less than a heartbeat period ago, so it may not have
    heard from every peer yet; a client that knows other registries asks them first. `more`: a full listing has
    more pages (`Query.after`)."""

    type: Literal["swarm_view"] = "swarm_view"
    peers: list[PeerInfo]
    warming: bool = False
    more: bool = False

    omitted_when_default = frozenset({"warming", "more"})


AdapterTarget = Literal["qkv", "out"]
MAX_ADAPTER_PAIRS = 8192
"""Low-rank pairs of one adapter: two projections on each of up to 4096 layers."""


class AdapterPair(_Strict):
    """One projection's low-rank pair: `a` [rank, in features] and `b` [out features, rank] of layer `layer`'s
    `target` (`qkv`: the fused query-key-value projection, rows as all query heads then key heads then value
    heads; `out`: the attention output projection). As a gradient, the same fields hold dL/da and dL/db."""

    layer: LayerIndex
    target: AdapterTarget
    a: WireTensor
    b: WireTensor


class WireAdapter(_Strict):
    """A low-rank adapter (LoRA): each pair adds `alpha / rank * b @ a @ x` to its projection's output."""

    rank: Annotated[int, Field(ge=1, le=1024)]
    alpha: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]
    pairs: Annotated[list[AdapterPair], Field(min_length=1, max_length=MAX_ADAPTER_PAIRS)]

    @model_validator(mode="after")
    def _one_pair_per_projection(self) -> WireAdapter:
        keys = [(pair.layer, pair.target) for pair in self.pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("an adapter has at most one pair per layer and target")
        return self


RelayKey = Annotated[str, Field(min_length=32, max_length=128, pattern=r"^[0-9a-f]+$")]
"""A secret (hex) with which other peers may step a session on its owner's behalf (`Step.relay`)."""
MAX_RELAY_HOPS = 64


class OpenSession(_Strict):
    """Reserve a KV cache for layers [start, end) of this node for `batch_size` x `max_length` tokens; with an
    `adapter` (pairs for layers inside [start, end) only), every step of the session runs with it. With a
    `relay_key`, the previous peer of the client's chain may send the session's steps (`Step.relay`)."""

    type: Literal["open_session"] = "open_session"
    session_id: Id
    start: LayerIndex
    end: LayerIndex
    max_length: Annotated[int, Field(ge=1, le=2**24)]
    batch_size: Annotated[int, Field(ge=1, le=2**16)]
    adapter: WireAdapter | None = None
    relay_key: RelayKey | None = None

    omitted_when_default = frozenset({"adapter", "relay_key"})


class SessionOpened(_Strict):
    type: Literal["session_opened"] = "session_opened"
    session_id: Id


MAX_SESSIONS_PER_STEP = 1024


class RelayHop(_Strict):
    """A later link of a client's chain, for node-to-node forwarding: the node at `address` serves the session
    `session_id` (opened with `relay_key`) and answers its step, numbered `step_id` on the client's connection to
    it, to the client. `length`: as `Step.lengths`."""

    address: Annotated[str, Field(min_length=1, max_length=512, pattern=PRINTABLE)]
    session_id: Id
    relay_key: RelayKey
    step_id: Count
    length: Count | None = None

    omitted_when_default = frozenset({"length"})


class Step(_Strict):
    """New positions of one or more sessions opened on this connection, their rows stacked: session i owns the
    `rows[i]` rows after those of the sessions before it in hidden [R, T, H], position_ids [R, T] and
    attention_mask [R, T] (all T new tokens each, R the sum of `rows`).

    `hypo_ids` [R], when given, reorders each session's cache rows before the step (beam search): a session's
    entries index its own rows. `lengths`, when given, has one entry per session: the number of tokens its cache
    keeps before the step (at most what it holds): the rest, speculative tokens the client rejected, are
    forgotten. `step_id` is unique among the steps in flight on the connection; the reply carries it, so a client
    may send the next step before this one's reply arrives."""

    type: Literal["step"] = "step"
    step_id: Count
    session_ids: Annotated[list[Id], Field(min_length=1, max_length=MAX_SESSIONS_PER_STEP)]
    rows: Annotated[list[Annotated[int, Field(ge=1, le=2**16)]], Field(min_length=1, max_length=MAX_SESSIONS_PER_STEP)]
    hidden: WireTensor
    position_ids: WireTensor
    attention_mask: WireTensor | None = None
    hypo_ids: WireTensor | None = None
    lengths: Annotated[list[Count], Field(max_length=MAX_SESSIONS_PER_STEP)] | None = None
    relay: Annotated[list[RelayHop], Field(min_length=1, max_length=MAX_RELAY_HOPS)] | None = None
    """The rest of the chain (node-to-node forwarding): this node sends its output, as the next hop's step, to
    the first of them, which does the same with the rest. Only for a step of one session."""
    relay_key: RelayKey | None = None
    """Set by a peer forwarding the step: the session's key (`OpenSession.relay_key`) in place of its owner's
    connection. The node then answers to the session's owner, not to the peer."""

    omitted_when_default = frozenset({"attention_mask", "hypo_ids", "lengths", "relay", "relay_key"})

    @model_validator(mode="after")
    def _one_entry_per_session(self) -> Step:
        if len(self.session_ids) != len(self.rows):
            raise ValueError("session_ids and rows must have one entry per session")
        if self.lengths is not None and len(self.lengths) != len(self.session_ids):
            raise ValueError("lengths must have one entry per session")
        if (self.relay is not None or self.relay_key is not None) and len(self.session_ids) != 1:
            raise ValueError("a relayed step carries one session")
        if len(set(self.session_ids)) != len(self.session_ids):
            raise ValueError("a session may appear only once per step (its next step needs this one's result)")
        return self


class StepResult(_Strict):
    """The answer to a `Step`: hidden [R, T, H] in the request's codec, rows in the request's order. `errors`,
    when given, has one entry per session: None, or the error that ended that session's step (its rows are then
    zeros); it is left out when every session's step succeeded. `relay_error`: the step's output could not be
    forwarded to the next hop of its `relay` (the client goes on from there itself)."""

    type: Literal["step_result"] = "step_result"
    step_id: Count
    hidden: WireTensor
    errors: list[Error | None] | None = None
    relay_error: Error | None = None

    omitted_when_default = frozenset({"errors", "relay_error"})


class CloseSession(_Strict):
    type: Literal["close_session"] = "close_session"
    session_id: Id


class SessionClosed(_Strict):
    type: Literal["session_closed"] = "session_closed"
    session_id: Id


class Forward(_Strict):
    """A stateless pass over layers [start, end): no cache is kept, `attention_mask` covers all T; with an
    `adapter` (pairs for layers inside [start, end) only)."""

    type: Literal["forward"] = "forward"
    start: LayerIndex
    end: LayerIndex
    hidden: WireTensor
    position_ids: WireTensor
    attention_mask: WireTensor | None = None
    adapter: WireAdapter | None = None

    omitted_when_default = frozenset({"adapter"})


class ForwardResult(_Strict):
    type: Literal["forward_result"] = "forward_result"
    hidden: WireTensor


class Backward(_Strict):
    """The gradient of a stateless pass over layers [start, end): the node runs `forward` on `hidden` again (with
    `adapter`, if any) and returns the gradient of sum(output * `grad_output`) with respect to `hidden` and to
    the adapter's tensors. The node's own weights never change."""

    type: Literal["backward"] = "backward"
    start: LayerIndex
    end: LayerIndex
    hidden: WireTensor
    position_ids: WireTensor
    attention_mask: WireTensor | None = None
    grad_output: WireTensor
    adapter: WireAdapter | None = None

    omitted_when_default = frozenset({"attention_mask", "adapter"})


class BackwardResult(_Strict):
    """`grad_hidden` has `hidden`'s shape and dtype; `adapter_grads` one pair per pair of the request's adapter,
    in its order (empty without one)."""

    type: Literal["backward_result"] = "backward_result"
    grad_hidden: WireTensor
    adapter_grads: Annotated[list[AdapterPair], Field(max_length=MAX_ADAPTER_PAIRS)] = []

    omitted_when_default = frozenset({"adapter_grads"})


class Error(_Strict):
    """A request failed. `step_id` names the step whose frame was refused as a whole; `session_id` the session
    an `open_session` or `close_session` was about."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: Annotated[str, Field(max_length=4096)]
    session_id: Id | None = None
    step_id: Count | None = None

    omitted_when_default = frozenset({"session_id", "step_id"})


Message = Annotated[
    Union[
        Hello,
        Welcome,
        Announce,
        Leave,
        Ack,
        Query,
        Report,
        SwarmView,
        OpenSession,
        SessionOpened,
        Step,
        StepResult,
        CloseSession,
        SessionClosed,
        Forward,
        ForwardResult,
        Backward,
        BackwardResult,
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


MAX_MAP_ENTRIES = 64
"""Entries of one msgpack map: a message or tensor has a few dozen fields at most."""
MAX_LIST_ITEMS = 2**16
"""Items of one list: a step names at most 1024 sessions and a tensor 4 dimensions; a swarm view lists peers."""
MAX_STR_BYTES = 4 * 4096
"""Bytes of one string: the longest (an error's message) is 4096 characters, at most 4 bytes each in UTF-8."""
MAX_VALUES = 2**18
"""Values in one frame, counted while unpacking: a 1024-session step holds ~2K, a swarm view ~35 per peer. Each
value takes a byte of the frame or more but up to ~100 bytes unpacked (an empty list: 1 byte, then a list
object), so without a count a 57 MiB frame unpacked into gigabytes before its type was even read."""


class _TooManyValues(Exception):
    pass


class _ValueBudget:
    """Counts the values of the lists and maps msgpack has built, and stops it past `MAX_VALUES`."""

    def __init__(self) -> None:
        self.left = MAX_VALUES

    def list(self, items: list[object]) -> list[object]:
        self.left -= len(items) + 1
        if self.left < 0:
            raise _TooManyValues
        return items

    def map(self, entries: dict[str, object]) -> dict[str, object]:
        self.left -= 2 * len(entries) + 1
        if self.left < 0:
            raise _TooManyValues
        return entries


def _unpack(frame: bytes) -> object:
    """The frame's msgpack, with every length bounded by what a valid message can hold (`MAX_*`)."""
    limits: dict[str, int] = dict(
        max_str_len=MAX_STR_BYTES,
        max_bin_len=len(frame),
        max_array_len=MAX_LIST_ITEMS,
        max_map_len=MAX_MAP_ENTRIES,
        max_ext_len=0,  # no extension types (timestamps included) are part of the protocol
    )
    if len(frame) <= MAX_VALUES:  # a value takes a byte or more: this frame cannot hold too many (the hot path)
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, **limits)
    budget = _ValueBudget()
    return msgpack.unpackb(
        frame, raw=False, strict_map_key=True, list_hook=budget.list, object_hook=budget.map, **limits
    )


def decode_message(frame: bytes | str, max_bytes: int | None = None) -> Message:
    """Parse and validate one frame, or raise `ProtocolError` with the code to answer with."""
    if isinstance(frame, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "text frames are not part of the protocol; send binary msgpack")
    if max_bytes is not None and len(frame) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame of {len(frame)} bytes exceeds the limit of {max_bytes}")
    try:
        payload = _unpack(frame)
    except _TooManyValues:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"frame holds more than {MAX_VALUES} msgpack values; no message has that many"
        ) from None
    except Exception as exc:  # msgpack raises several unrelated exception types on garbage (and on limits)
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a frame must be a msgpack map with a string 'type' field")
    try:
        return _MESSAGE_ADAPTER.validate_python(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        step_id = payload.get("step_id")
        step_id = step_id if type(step_id) is int and 0 <= step_id <= 2**40 else None
        message = f"invalid {payload['type']!r} message at {_printable(where)}: {_printable(first['msg'])}"
        raise ProtocolError(ErrorCode.BAD_REQUEST, message, step_id) from None


def _printable(text: str) -> str:
    """`text` with control characters escaped: field names and tags in refusals come from the peer, and a newline
    in one would forge a line wherever the refusal is logged."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
