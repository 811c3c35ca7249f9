"""Checks on untrusted step inputs, done before anything touches a cache (never `assert`).

The checks read the frame's bytes through numpy views: a decode step's tensors are a few dozen values, and
a numpy reduction over them costs a microsecond where the same torch op costs several (this runs for every
step a node serves). Only what passes is copied into torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from node.sessions import Session
from swarm.errors import ProtocolError
from swarm.protocol import StepGroup, WireTensor

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
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
    attention_mask: torch.Tensor
    hypo_ids: torch.Tensor | None


def _bad(message: str) -> ProtocolError:
    return ProtocolError("bad_request", message)


def check_layer_range(start: int, end: int, served: tuple[int, int]) -> None:
    if not served[0] <= start < end <= served[1]:
        raise _bad(f"layers [{start}, {end}) are not inside this node's span [{served[0]}, {served[1]})")


def decode_hidden(wire: WireTensor, hidden_size: int, max_batch: int) -> torch.Tensor:
    if wire.dtype not in FLOAT_DTYPES:
        raise _bad(f"hidden states must be one of {FLOAT_DTYPES}, got {wire.dtype}")
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


def decode_mask(wire: WireTensor | None, shape: tuple[int, int]) -> torch.Tensor:
    if wire is None:
        return torch.ones(shape, dtype=torch.bool)
    if wire.dtype not in MASK_DTYPES or tuple(wire.shape) != shape:
        raise _bad(f"attention_mask must be 0/1 of shape {list(shape)}, got {wire.dtype} {wire.shape}")
    mask = _values(wire, shape)
    if ((mask != 0) & (mask != 1)).any():
        raise _bad("attention_mask values must be 0 or 1")
    return torch.from_numpy(mask != 0)


def decode_hypo_ids(wire: WireTensor | None, batch: int) -> torch.Tensor | None:
    if wire is None:
        return None
    if wire.dtype not in INDEX_DTYPES or wire.shape != [batch]:
        raise _bad(f"hypo_ids must be int64 of shape [{batch}], got {wire.dtype} {wire.shape}")
    hypo_ids = _values(wire, (batch,))
    if hypo_ids.size and (hypo_ids.min() < 0 or hypo_ids.max() >= batch):
        raise _bad(f"hypo_ids must lie in [0, {batch})")
    return torch.from_numpy(hypo_ids.astype(np.int64))


def validate_step(
    session: Session,
    hidden: WireTensor,
    position_ids: WireTensor,
    attention_mask: WireTensor | None,
    hypo_ids: WireTensor | None,
    hidden_size: int,
) -> StepInputs:
    """Everything a step needs, checked against the session it would change."""
    decoded = decode_hidden(hidden, hidden_size, session.batch_size)
    batch, tokens, _ = decoded.shape
    _check_fits(session, batch, tokens)
    positions = decode_positions(position_ids, (batch, tokens), session.max_length, session.last_positions)
    return StepInputs(
        decoded, positions, decode_mask(attention_mask, (batch, tokens)), decode_hypo_ids(hypo_ids, batch)
    )


def decode_group(message: StepGroup, hidden_size: int, max_length: int) -> StepInputs:
    """A `step_group`'s stacked tensors, checked once for all its sessions: one token per row."""
    rows = sum(message.rows)
    hidden = decode_hidden(message.hidden, hidden_size, rows)
    if hidden.shape[:2] != (rows, 1):
        raise _bad(f"a step_group carries one token for each of its {rows} rows, got hidden {list(hidden.shape)}")
    positions = decode_positions(message.position_ids, (rows, 1), max_length)
    return StepInputs(hidden, positions, decode_mask(message.attention_mask, (rows, 1)), None)


def validate_group_member(session: Session, inputs: StepInputs) -> StepInputs:
    """One session's rows of a decoded `step_group`, checked against that session."""
    _check_fits(session, inputs.hidden.shape[0], inputs.hidden.shape[1])
    _check_positions(inputs.position_ids.numpy(), session.max_length, session.last_positions)
    return inputs


def _check_fits(session: Session, batch: int, tokens: int) -> None:
    if batch != session.batch_size:
        raise _bad(f"session was opened for batch {session.batch_size}, step has {batch} rows")
    if session.length + tokens > session.max_length:
        raise _bad(
            f"step would grow the session to {session.length + tokens} tokens, max_length is {session.max_length}"
        )
