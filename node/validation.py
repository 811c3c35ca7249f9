"""Checks on untrusted step inputs, done before anything touches a cache (never `assert`).

The checks read the frame's bytes through numpy views: a decode step's tensors are a few dozen values, and
a numpy reduction over them costs a microsecond where the same torch op costs several (this runs for every
step a node serves). Only what passes is copied into torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from swarm.dtypes import FLOAT_DTYPE_NAMES
from swarm.errors import ErrorCode, ProtocolError
from swarm.models.adapters import LayerAdapters, LowRank, target_shape
from swarm.models.spec import ModelSpec
from swarm.node.sessions import Session
from swarm.protocol import Backward, Forward, Step, WireAdapter, WireTensor

INDEX_DTYPES = ("int64", "int32")
MASK_DTYPES = ("bool", "int64", "int32", "int8", "uint8")

_NUMPY_DTYPES = {"int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.uint8}
_EXPONENT_BITS = {"float32": (np.uint32, 0x7F800000), "float16": (np.uint16, 0x7C00), "bfloat16": (np.uint16, 0x7F80)}
"""Each float format's exponent field: a value is NaN or infinite exactly when all of its exponent bits are set
(read as unsigned integers, which also covers bfloat16, a format numpy lacks)."""


@dataclass(frozen=True)
class StepInputs:
    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    """None: every new token is real (a frame without a mask, or with one of only ones)."""
    hypo_ids: torch.Tensor | None
    cut_to: int | None = None
    """The session first keeps only this many cached tokens (`Step.lengths`: rejected speculative tokens)."""


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def position_limit(spec: ModelSpec, max_length: int) -> int:
    """Positions a step or forward may use: below `--max-length`, and below the model's position embeddings unless
    it has none (ALiBi): a rotary model was trained on no more, and learned positions (applied by the client) stop
    there. A peer asking for more gets nothing an honest client needs and can only make the node work longer."""
    return max_length if spec.alibi else min(max_length, spec.max_positions)


def check_layer_range(start: int, end: int, served: tuple[int, int]) -> None:
    if not served[0] <= start < end <= served[1]:
        raise _bad(f"layers [{start}, {end}) are not inside this node's span [{served[0]}, {served[1]})")


def decode_hidden(wire: WireTensor, hidden_size: int, max_batch: int) -> torch.Tensor:
    if wire.dtype not in FLOAT_DTYPE_NAMES:
        raise _bad(f"hidden states must be one of {FLOAT_DTYPE_NAMES}, got {wire.dtype}")
    if len(wire.shape) != 3 or wire.shape[2] != hidden_size:
        raise _bad(f"hidden states must have shape [batch, tokens, {hidden_size}], got {wire.shape}")
    batch, tokens, _ = wire.shape
    if not 1 <= batch <= max_batch or tokens < 1:
        raise _bad(f"hidden states need 1..{max_batch} rows and at least one token, got {wire.shape}")
    hidden = wire.to_torch()
    if wire.codec == "raw":
        bits, exponent = _EXPONENT_BITS[wire.dtype]
        finite = not ((np.frombuffer(wire.data, dtype=bits) & exponent) == exponent).any()
    else:  # compressed: check what it decodes to (a forged scale can be NaN)
        finite = bool(torch.isfinite(hidden).all())
    if not finite:
        raise _bad("hidden states contain NaN or infinite values")
    return hidden


def _values(wire: WireTensor, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only numpy view of an integer or bool tensor's bytes (length already checked on parsing)."""
    return np.frombuffer(wire.data, dtype=_NUMPY_DTYPES[wire.dtype]).reshape(shape)


def decode_positions(
    wire: WireTensor, shape: tuple[int, int], limit: int, previous: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions in [0, limit), not decreasing along a row nor below each row's `previous` last position."""
    if wire.dtype not in INDEX_DTYPES or tuple(wire.shape) != shape:
        raise _bad(f"position_ids must be int64 of shape {list(shape)}, got {wire.dtype} {wire.shape}")
    positions = _values(wire, shape)
    _check_positions(positions, limit, previous)
    return torch.from_numpy(positions.astype(np.int64))


def _check_positions(positions: np.ndarray, limit: int, previous: torch.Tensor | None) -> None:
    if positions.size and (positions.min() < 0 or positions.max() >= limit):
        raise _bad(f"position_ids must lie in [0, {limit})")
    if positions.shape[1] > 1 and (positions[:, 1:] < positions[:, :-1]).any():
        raise _bad("position_ids must not decrease along a row")
    if previous is not None and (positions[:, 0] < previous.cpu().numpy()).any():
        raise _bad("position_ids go backwards relative to the previous step")


def decode_mask(wire: WireTensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """The new tokens' padding mask, or None when every one of them is real."""
    if wire is None:
        return None
    if wire.dtype not in MASK_DTYPES or tuple(wire.shape) != shape:
        raise _bad(f"attention_mask must be 0/1 of shape {list(shape)}, got {wire.dtype} {wire.shape}")
    mask = _values(wire, shape)
    if ((mask != 0) & (mask != 1)).any():
        raise _bad("attention_mask values must be 0 or 1")
    real = mask != 0
    return None if real.all() else torch.from_numpy(real)


def decode_hypo_ids(wire: WireTensor | None, rows: list[int]) -> torch.Tensor | None:
    """Beam reorders, one per row: each session's entries index its own rows."""
    if wire is None:
        return None
    total = sum(rows)
    if wire.dtype not in INDEX_DTYPES or wire.shape != [total]:
        raise _bad(f"hypo_ids must be int64 of shape [{total}], got {wire.dtype} {wire.shape}")
    hypo_ids = _values(wire, (total,))
    first = 0
    for count in rows:
        own = hypo_ids[first : first + count]
        if own.min() < 0 or own.max() >= count:
            raise _bad(f"a session's hypo_ids must lie in [0, {count}), its own rows")
        first += count
    return torch.from_numpy(hypo_ids.astype(np.int64))


def decode_step(message: Step, hidden_size: int, max_length: int) -> StepInputs:
    """A step's stacked tensors, checked once for all its sessions: shapes, dtypes, finiteness, positions in
    [0, `max_length`) and not decreasing along a row, 0/1 masks, beam reorders within each session's rows."""
    rows = sum(message.rows)
    hidden = decode_hidden(message.hidden, hidden_size, rows)
    if hidden.shape[0] != rows:
        raise _bad(f"the step's sessions have {rows} rows together, hidden has {hidden.shape[0]}")
    shape = (rows, hidden.shape[1])
    return StepInputs(
        hidden,
        decode_positions(message.position_ids, shape, max_length),
        decode_mask(message.attention_mask, shape),
        decode_hypo_ids(message.hypo_ids, message.rows),
    )


def decode_forward(
    message: Forward | Backward, hidden_size: int, max_batch: int, limit: int, max_tokens: int
) -> StepInputs:
    """A stateless forward's tensors, checked like a step's, each row at most `limit` tokens (positions in
    [0, `limit`) leave an honest row no more) and all of them together at most `max_tokens`; the sizes are read
    from the frame before any tensor is decoded."""
    shape = message.hidden.shape
    if len(shape) == 3 and shape[1] > limit:
        raise _bad(f"a forward carries at most {limit} tokens a row here, got {shape[1]}")
    if len(shape) == 3 and shape[0] * shape[1] > max_tokens:
        raise _bad(f"a forward carries at most {max_tokens} tokens (batch x length) here, got {shape[0] * shape[1]}")
    hidden = decode_hidden(message.hidden, hidden_size, max_batch)
    tokens = (hidden.shape[0], hidden.shape[1])
    positions = decode_positions(message.position_ids, tokens, limit)
    return StepInputs(hidden, positions, decode_mask(message.attention_mask, tokens), None)


@dataclass(frozen=True)
class PassLimits:
    """What one stateless pass (`forward`, `backward`) may carry on this node."""

    hidden_size: int
    max_batch: int
    max_length: int
    max_tokens: int
    max_adapter_bytes: int

    def decode(
        self, message: Forward | Backward, spec: ModelSpec, served: tuple[int, int]
    ) -> tuple[StepInputs, LayerAdapters | None]:
        """The pass's checked tensors and adapter: layers inside `served`, sizes within these limits."""
        check_layer_range(message.start, message.end, served)
        limit = position_limit(spec, self.max_length)
        inputs = decode_forward(message, self.hidden_size, self.max_batch, limit, self.max_tokens)
        adapter = decode_adapter(message.adapter, spec, message.start, message.end, self.max_adapter_bytes)
        return inputs, adapter


def decode_grad_output(wire: WireTensor, hidden: torch.Tensor) -> torch.Tensor:
    """A backward's gradient of the span's output: the shape of the hidden states it goes with, finite."""
    if tuple(wire.shape) != tuple(hidden.shape):
        raise _bad(f"grad_output must have the hidden states' shape {list(hidden.shape)}, got {wire.shape}")
    return decode_hidden(wire, hidden.shape[2], hidden.shape[0])


def decode_adapter(
    wire: WireAdapter | None, spec: ModelSpec, start: int, end: int, max_bytes: int
) -> LayerAdapters | None:
    """A low-rank adapter for layers [start, end): at most `max_bytes` of tensors, every pair inside the layers,
    A [rank, in] and B [out, rank] of its projection's sizes, floating and finite."""
    if wire is None:
        return None
    size = sum(len(pair.a.data) + len(pair.b.data) for pair in wire.pairs)
    if size > max_bytes:
        raise _bad(f"adapter of {size} bytes exceeds this node's limit of {max_bytes} (--max-adapter-bytes)")
    pairs: dict[tuple[int, str], LowRank] = {}
    for pair in wire.pairs:
        if not start <= pair.layer < end:
            raise _bad(f"adapter pair for layer {pair.layer} is outside the requested layers [{start}, {end})")
        features_in, features_out = target_shape(spec, pair.target)
        expected = {"a": [wire.rank, features_in], "b": [features_out, wire.rank]}
        tensors = {}
        for name, tensor in (("a", pair.a), ("b", pair.b)):
            if tensor.dtype not in FLOAT_DTYPE_NAMES or tensor.shape != expected[name]:
                raise _bad(
                    f"adapter {name} of layer {pair.layer} {pair.target} must be floating of shape "
                    f"{expected[name]}, got {tensor.dtype} {tensor.shape}"
                )
            value = tensor.to_torch()
            if not bool(torch.isfinite(value).all()):
                raise _bad(f"adapter {name} of layer {pair.layer} {pair.target} holds NaN or infinite values")
            tensors[name] = value
        pairs[(pair.layer, pair.target)] = LowRank(tensors["a"], tensors["b"])
    return LayerAdapters(wire.alpha / wire.rank, pairs)


def session_rows(session: Session, inputs: StepInputs, rows: slice, cut_to: int | None = None) -> StepInputs:
    """One session's rows of a decoded step, checked against that session: its batch, its room left, and
    positions that do not go back behind its last step's (after the step's beam reorder). A step that first
    rolls the session back (`cut_to`) is checked against the session as it will be then (`cut_back`)."""
    own = StepInputs(
        inputs.hidden[rows],
        inputs.position_ids[rows],
        inputs.attention_mask[rows] if inputs.attention_mask is not None else None,
        inputs.hypo_ids[rows] if inputs.hypo_ids is not None else None,
        cut_to,
    )
    if cut_to is not None:
        if own.hypo_ids is not None:
            raise _bad("a step cannot both roll its session back (lengths) and reorder it (hypo_ids)")
        return own
    _check_fits(session, own.hidden.shape[0], own.hidden.shape[1])
    previous = session.last_positions
    if previous is not None and own.hypo_ids is not None:
        previous = previous[own.hypo_ids]
    _check_positions(own.position_ids.numpy(), session.max_length, previous)
    return own


def cut_back(session: Session, inputs: StepInputs) -> StepInputs:
    """Roll `session` back to `inputs.cut_to` tokens (speculative tokens its client rejected) and check the step
    against it as `session_rows` does; returns the step without the roll-back. Each row's last position moves
    back by as many tokens (they were all real: speculation drafts after the prompt)."""
    length = inputs.cut_to
    assert length is not None
    if length > session.length:
        raise _bad(f"lengths asks to keep {length} tokens, the session holds {session.length}")
    removed = session.length - length
    if removed:
        session.cache.truncate(length)  # type: ignore[attr-defined]
        session.length = length
        if session.last_positions is not None:
            session.last_positions = session.last_positions - removed
    _check_fits(session, inputs.hidden.shape[0], inputs.hidden.shape[1])
    _check_positions(inputs.position_ids.numpy(), session.max_length, session.last_positions)
    return StepInputs(inputs.hidden, inputs.position_ids, inputs.attention_mask, None)


def _check_fits(session: Session, batch: int, tokens: int) -> None:
    if batch != session.batch_size:
        raise _bad(f"session was opened for batch {session.batch_size}, step has {batch} rows")
    if session.length + tokens > session.max_length:
        raise _bad(
            f"step would grow the session to {session.length + tokens} tokens, max_length is {session.max_length}"
        )
