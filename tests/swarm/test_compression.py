"""The `int8-block` codec: exact byte layout, bounded error, and frames that stay what older peers expect."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from pydantic import ValidationError

from swarm.compression import BLOCK_SIZE, dequantize, quantize
from swarm.errors import ProtocolError
from swarm.protocol import CODECS, ForwardResult, PeerInfo, Step, WireTensor, decode_message, encode_message
from tests.swarm.test_protocol import peer


def compressed(tensor: torch.Tensor) -> WireTensor:
    return WireTensor.from_torch(tensor, "int8-block")


def through_the_wire(wire: WireTensor) -> torch.Tensor:
    decoded = decode_message(encode_message(ForwardResult(hidden=wire)))
    assert isinstance(decoded, ForwardResult)
    return decoded.hidden.to_torch()


def block_scales(tensor: torch.Tensor) -> torch.Tensor:
    """Each value's block absmax, the bound's unit, computed independently of the codec."""
    rows = tensor.float().reshape(-1, tensor.shape[-1])
    scales = torch.empty_like(rows)
    for first in range(0, rows.shape[1], BLOCK_SIZE):
        block = rows[:, first : first + BLOCK_SIZE]
        scales[:, first : first + BLOCK_SIZE] = block.abs().amax(dim=1, keepdim=True)
    return scales.reshape(tensor.shape)


def realistic_hidden(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """randn at per-row scales from 0.01 to 100, plus a few large outliers, as residual streams have."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(shape, generator=generator)
    hidden *= torch.logspace(-2, 2, math.prod(shape[:-1])).reshape(*shape[:-1], 1)
    flat = hidden.view(-1)
    picks = torch.randint(0, flat.numel(), (8,), generator=generator)
    flat[picks] = torch.tensor([300.0, -250.0, 1000.0, -40.0, 75.0, -900.0, 5.0, 2000.0])
    return hidden


@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 3, 100), (3, 7), (1, 2, 130), (5,), (2, 1, 1), (2, 2, 4096)])
def test_round_trip_keeps_shape_and_stays_within_half_a_step(shape: tuple[int, ...]) -> None:
    tensor = realistic_hidden(shape)
    restored = through_the_wire(compressed(tensor))
    assert restored.shape == tensor.shape and restored.dtype == tensor.dtype
    bound = block_scales(tensor) / 254
    assert ((restored - tensor).abs() <= bound * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decoding_gives_the_declared_dtype(dtype: torch.dtype) -> None:
    tensor = realistic_hidden((2, 3, 96)).clamp(-60_000, 60_000).to(dtype)
    wire = compressed(tensor)
    assert wire.dtype == {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    restored = through_the_wire(wire)
    assert restored.dtype == dtype
    # half a step, plus rounding the decoded value to the declared dtype
    bound = block_scales(tensor) / 254 + restored.float().abs() * torch.finfo(dtype).eps
    assert ((restored.float() - tensor.float()).abs() <= bound * (1 + 1e-5)).all()


def test_zero_blocks_and_empty_tensors_decode_exactly() -> None:
    tensor = torch.zeros(2, 3, 100)
    tensor[1, 2, 70:] = torch.linspace(-1, 1, 30)  # one row's last (short) block is not zero
    restored = through_the_wire(compressed(tensor))
    assert torch.isfinite(restored).all()
    assert torch.equal(restored[0], tensor[0]) and torch.equal(restored[1, :2], tensor[1, :2])
    assert torch.equal(restored[1, 2, :64], tensor[1, 2, :64])
    for shape in ((0, 4), (3, 0), (2, 0, 64)):
        empty = compressed(torch.empty(shape))
        assert empty.data == b"" and empty.scales == b"" and through_the_wire(empty).shape == shape


def test_non_finite_blocks_decode_as_nan_and_leave_other_blocks_alone() -> None:
    tensor = realistic_hidden((2, 130))
    tensor[0, 3], tensor[1, 129] = float("nan"), float("inf")
    restored = through_the_wire(compressed(tensor))
    assert restored[0, :64].isnan().all() and restored[1, 128:].isnan().all()
    finite = torch.ones_like(tensor, dtype=torch.bool)
    finite[0, :64], finite[1, 128:] = False, False
    assert torch.isfinite(restored[finite]).all()
    assert ((restored - tensor).abs()[finite] <= (block_scales(tensor) / 254 * (1 + 1e-5))[finite]).all()


def test_compressed_size_is_a_quarter_of_float32_plus_one_scale_per_block() -> None:
    tensor = torch.randn(4, 16, 4096)
    wire = compressed(tensor)
    assert len(wire.data) == tensor.numel()
    assert len(wire.scales or b"") == 4 * 16 * (4096 // BLOCK_SIZE) * 4
    raw_frame = encode_message(ForwardResult(hidden=WireTensor.from_torch(tensor)))
    ratio = len(encode_message(ForwardResult(hidden=wire))) / len(raw_frame)
    assert 0.25 < ratio < 0.27  # 1 + 4/64 bytes per value instead of 4


def test_wrong_byte_lengths_are_refused() -> None:
    good = compressed(torch.randn(2, 3, 100))
    fields = good.model_dump()
    wrong = {
        "short data": dict(fields, data=good.data[:-1]),
        "long scales": dict(fields, scales=(good.scales or b"") + b"\0\0\0\0"),
        "no scales": dict(fields, scales=None),
        "integer dtype": dict(fields, dtype="int8"),
        "no dimensions": dict(fields, shape=[], data=b"\0", scales=b"\0\0\0\0"),
        "raw with scales": dict(WireTensor.from_torch(torch.randn(2, 3)).model_dump(), scales=b"\0\0\0\0"),
        "unknown codec": dict(fields, codec="int4"),
    }
    for what, values in wrong.items():
        with pytest.raises(ValidationError):
            WireTensor(**values)
        frame = msgpack.packb({"type": "forward_result", "hidden": values}, use_bin_type=True)
        with pytest.raises(ProtocolError) as info:
            decode_message(frame)
        assert info.value.code == "bad_request", what


def test_only_floating_tensors_with_dimensions_compress() -> None:
    for tensor in (torch.arange(4), torch.ones(3, dtype=torch.bool), torch.tensor(1.0)):
        with pytest.raises(TypeError):
            compressed(tensor)


def test_realistic_hidden_states_error_relative_to_uncompressed() -> None:
    tensor = realistic_hidden((4, 32, 512), seed=1)
    restored = through_the_wire(compressed(tensor))
    error = (restored - tensor).abs()
    assert (error <= block_scales(tensor) / 254 * (1 + 1e-5)).all()
    relative = (error.norm() / tensor.norm()).item()
    assert relative < 0.01, relative


def test_quantize_is_idempotent_so_requantizing_between_hops_adds_no_error() -> None:
    tensor = realistic_hidden((3, 200))
    once = dequantize(*quantize(tensor), [3, 200], torch.float32)
    twice = dequantize(*quantize(once), [3, 200], torch.float32)
    torch.testing.assert_close(twice, once, atol=1e-6, rtol=1e-6)


def test_raw_frames_carry_no_new_fields() -> None:
    step = Step(
        session_ids=["s"],
        rows=[1],
        step_id=0,
        hidden=WireTensor.from_torch(torch.randn(1, 1, 8)),
        position_ids=WireTensor.from_torch(torch.zeros(1, 1, dtype=torch.long)),
    )
    payload = msgpack.unpackb(encode_message(step))
    assert set(payload["hidden"]) == {"dtype", "shape", "data"}
    assert set(payload["position_ids"]) == {"dtype", "shape", "data"}
    compressed_step = step.model_copy(update={"hidden": compressed(torch.randn(1, 1, 8))})
    assert msgpack.unpackb(encode_message(compressed_step))["hidden"]["codec"] == "int8-block"


def test_peers_advertise_codecs_and_old_peer_info_still_parses() -> None:
    old = peer()
    assert old.codecs == ["raw"] and "codecs" not in msgpack.unpackb(encode_message(old))
    advertising = peer(codecs=list(CODECS))
    assert PeerInfo.model_validate(msgpack.unpackb(encode_message(advertising))).codecs == list(CODECS)
    assert peer(codecs=["raw", "int4-from-the-future"]).codecs[1] == "int4-from-the-future"
