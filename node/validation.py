"""Checks on untrusted step inputs, done before anything touches a cache (never `assert`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from node.sessions import Session
from swarm.errors import ProtocolError
from swarm.protocol import WireTensor

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INDEX_DTYPES = ("int64", "int32")
MASK_DTYPES = ("bool", "int64", "int32", "int8", "uint8")


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
    if not torch.isfinite(hidden).all():
        raise _bad("hidden states contain NaN or infinite values")
    return hidden


def decode_positions(wire: WireTensor, shape: tuple[int, int], limit: int) -> torch.Tensor:
    if wire.dtype not in INDEX_DTYPES or tuple(wire.shape) != shape:
        raise _bad(f"position_ids must be int64 of shape {list(shape)}, got {wire.dtype} {wire.shape}")
    positions = wire.to_torch().long()
    if positions.numel() and (positions.min() < 0 or positions.max() >= limit):
        raise _bad(f"position_ids must lie in [0, {limit})")
    if positions.shape[1] > 1 and (positions[:, 1:] < positions[:, :-1]).any():
        raise _bad("position_ids must not decrease along a row")
    return positions


def decode_mask(wire: WireTensor | None, shape: tuple[int, int]) -> torch.Tensor:
    if wire is None:
        return torch.ones(shape, dtype=torch.bool)
    if wire.dtype not in MASK_DTYPES or tuple(wire.shape) != shape:
        raise _bad(f"attention_mask must be 0/1 of shape {list(shape)}, got {wire.dtype} {wire.shape}")
    mask = wire.to_torch()
    if ((mask != 0) & (mask != 1)).any():
        raise _bad("attention_mask values must be 0 or 1")
    return mask.bool()


def decode_hypo_ids(wire: WireTensor | None, batch: int) -> torch.Tensor | None:
    if wire is None:
        return None
    if wire.dtype not in INDEX_DTYPES or wire.shape != [batch]:
        raise _bad(f"hypo_ids must be int64 of shape [{batch}], got {wire.dtype} {wire.shape}")
    hypo_ids = wire.to_torch().long()
    if hypo_ids.numel() and (hypo_ids.min() < 0 or hypo_ids.max() >= batch):
        raise _bad(f"hypo_ids must lie in [0, {batch})")
    return hypo_ids


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
    if batch != session.batch_size:
        raise _bad(f"session was opened for batch {session.batch_size}, step has {batch} rows")
    if session.length + tokens > session.max_length:
        raise _bad(
            f"step would grow the session to {session.length + tokens} tokens, max_length is {session.max_length}"
        )
    positions = decode_positions(position_ids, (batch, tokens), session.max_length)
    if session.last_positions is not None and (positions[:, 0] < session.last_positions).any():
        raise _bad("position_ids go backwards relative to the previous step")
    return StepInputs(
        decoded, positions, decode_mask(attention_mask, (batch, tokens)), decode_hypo_ids(hypo_ids, batch)
    )
