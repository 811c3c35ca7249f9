"""Untrusted step inputs are checked before they reach a cache."""

from __future__ import annotations

import pytest
import torch

from swarm.errors import ProtocolError
from swarm.node.sessions import SessionTable
from swarm.node.validation import StepInputs, check_layer_range, decode_step, session_rows
from swarm.protocol import Step, WireTensor

HIDDEN = 8


class Rows:
    def release(self) -> None:
        pass


def session(length: int = 0, max_length: int = 16, batch: int = 2):
    opened = SessionTable(1000, 4).open("s", 1, (0, 4), max_length, batch, 0.0, lambda n: n, lambda b, n: Rows())
    opened.length = length
    return opened


def wire(tensor: torch.Tensor) -> WireTensor:
    return WireTensor.from_torch(tensor)


def validated(s, hidden: WireTensor, positions: WireTensor, mask=None, hypo=None) -> StepInputs:
    """A one-session step frame's tensors, decoded and checked against session `s` as a node does."""
    rows = hidden.shape[0] if hidden.shape else 1
    message = Step.model_construct(
        type="step",
        step_id=0,
        session_ids=["s"],
        rows=[rows],
        hidden=hidden,
        position_ids=positions,
        attention_mask=mask,
        hypo_ids=hypo,
    )
    return session_rows(s, decode_step(message, HIDDEN, s.max_length), slice(0, rows))


def check(s, hidden, positions, mask=None, hypo=None):
    return validated(
        s, wire(hidden), wire(positions), None if mask is None else wire(mask), None if hypo is None else wire(hypo)
    )


def rejects(match: str, *args) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        check(*args)
    assert info.value.code == "bad_request"


def test_a_well_formed_step_passes() -> None:
    inputs = check(
        session(), torch.randn(2, 3, HIDDEN), torch.arange(3).expand(2, 3), torch.ones(2, 3, dtype=torch.bool)
    )
    assert inputs.hidden.shape == (2, 3, HIDDEN) and inputs.attention_mask is None  # every new token is real


def test_wrong_shapes_dtypes_and_values_are_refused() -> None:
    positions = torch.arange(3).expand(2, 3)
    rejects("shape", session(), torch.randn(2, 3, HIDDEN + 1), positions)
    rejects("must be one of", session(), torch.ones(2, 3, HIDDEN, dtype=torch.int64), positions)
    rejects("batch 2", session(), torch.randn(1, 3, HIDDEN), positions[:1])
    rejects("NaN", session(), torch.full((2, 3, HIDDEN), float("nan")), positions)
    rejects("position_ids", session(), torch.randn(2, 3, HIDDEN), positions.float())
    rejects("0 or 1", session(), torch.randn(2, 3, HIDDEN), positions, torch.full((2, 3), 7))
    rejects("hypo_ids", session(), torch.randn(2, 3, HIDDEN), positions, None, torch.tensor([0, 5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_non_finite_value_anywhere_is_refused_in_every_float_dtype(dtype: torch.dtype) -> None:
    positions = torch.arange(3).expand(2, 3)
    info = torch.finfo(dtype)
    extremes = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 4, -0.0, 0.0, 1.0, -1.0])
    hidden = extremes.repeat(6).reshape(2, 3, HIDDEN).to(dtype)
    inputs = check(session(), hidden, positions)
    assert torch.equal(inputs.hidden, hidden)  # the largest, subnormal and signed-zero values all pass unchanged
    for bad in (float("nan"), float("inf"), float("-inf")):
        poisoned = hidden.clone()
        poisoned[1, 2, 5] = bad
        rejects("NaN", session(), poisoned, positions)


def test_integer_and_bool_inputs_arrive_as_torch_tensors_of_the_dtype_the_layers_use() -> None:
    hidden = torch.randn(2, 3, HIDDEN)
    for mask_dtype in (torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64):
        mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=mask_dtype)
        inputs = check(session(), hidden, torch.arange(3).expand(2, 3).int(), mask, torch.tensor([1, 0]))
        assert inputs.attention_mask.dtype == torch.bool and inputs.attention_mask.tolist() == mask.bool().tolist()
        assert inputs.position_ids.dtype == torch.int64 and inputs.position_ids.tolist() == [[0, 1, 2]] * 2
        assert inputs.hypo_ids is not None and inputs.hypo_ids.tolist() == [1, 0]
        inputs.position_ids.add_(1)  # writable copies, not views of the frame's bytes
        inputs.attention_mask[0, 0] = True


def test_positions_stay_inside_the_session_and_move_forward() -> None:
    rejects("max_length", session(length=15), torch.randn(2, 2, HIDDEN), torch.tensor([[14, 15], [14, 15]]))
    rejects(r"\[0, 16\)", session(), torch.randn(2, 1, HIDDEN), torch.tensor([[16], [0]]))
    rejects("decrease", session(), torch.randn(2, 2, HIDDEN), torch.tensor([[1, 0], [0, 1]]))
    moved = session(length=3)
    moved.last_positions = torch.tensor([2, 2])
    rejects("backwards", moved, torch.randn(2, 1, HIDDEN), torch.tensor([[1], [3]]))


def test_layer_ranges_must_lie_inside_the_span() -> None:
    check_layer_range(2, 4, (0, 4))
    for start, end in ((0, 5), (3, 3), (-1, 2)):
        with pytest.raises(ProtocolError, match="span"):
            check_layer_range(start, end, (0, 4))


def test_compressed_hidden_states_decode_and_non_finite_scales_are_refused() -> None:
    positions = torch.arange(3).expand(2, 3)
    hidden = WireTensor.from_torch(torch.randn(2, 3, HIDDEN), "int8-block")
    inputs = validated(session(), hidden, wire(positions))
    assert inputs.hidden.dtype == torch.float32 and inputs.hidden.shape == (2, 3, HIDDEN)
    for bad in (float("nan"), float("inf")):
        scales = torch.full((2 * 3,), bad).numpy().tobytes()
        forged = hidden.model_copy(update={"scales": scales})
        with pytest.raises(ProtocolError, match="NaN") as info:
            validated(session(), forged, wire(positions))
        assert info.value.code == "bad_request"
    nan_input = WireTensor.from_torch(torch.full((2, 3, HIDDEN), float("nan")), "int8-block")
    with pytest.raises(ProtocolError, match="NaN"):
        validated(session(), nan_input, wire(positions))
