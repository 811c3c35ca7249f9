"""Linear layers laid out once for oneDNN compute what `nn.Linear` does, and are used where they pay."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from swarm.models import ModelArchitecture
from swarm.models.local import LocalModules
from swarm.models.packed import PackedLinear, pack_linears, packable_dtypes, packing_available
from swarm.node.span import LoadedSpan
from tests.checkpoints import build_tiny

pytestmark = pytest.mark.skipif(not packing_available(), reason="oneDNN is not available in this torch build")

CPU = torch.device("cpu")


def linear(inputs: int, outputs: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(inputs, outputs, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "shape", [(1, 96), (7, 96), (2, 5, 96), (3, 1, 96)], ids=["one row", "rows", "batch of rows", "decode batch"]
)
def test_a_packed_linear_computes_what_nn_linear_does(shape: tuple[int, ...], bias: bool) -> None:
    plain = linear(96, 320, bias)
    packed = PackedLinear(plain)
    x = torch.randn(*shape)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), plain(x), atol=2e-6, rtol=1e-5)


@pytest.mark.skipif(torch.bfloat16 not in packable_dtypes(), reason="no oneDNN bfloat16 kernels on this CPU")
def test_a_packed_bfloat16_linear_computes_the_same_bits_as_nn_linear() -> None:
    """`F.linear` in bfloat16 already runs on oneDNN; packing only saves its per-call reorder."""
    plain = linear(96, 320).to(torch.bfloat16)
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(PackedLinear(plain)(x), plain(x))


def test_a_strided_input_such_as_the_last_position_of_a_batch_is_accepted() -> None:
    plain = linear(96, 320)
    last = torch.randn(4, 6, 96)[:, -1:]
    assert not last.is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(plain)(last), plain(last), atol=2e-6, rtol=1e-5)


def test_the_weight_reads_back_bit_for_bit() -> None:
    plain = linear(96, 320)
    assert torch.equal(PackedLinear(plain).weight, plain.weight)


def test_gradients_flow_to_the_input_as_through_nn_linear() -> None:
    """The node's backward and the client's soft-prompt training run through packed layers."""
    plain = linear(96, 320)
    x = torch.randn(3, 96, requires_grad=True)
    (PackedLinear(plain)(x) ** 2).sum().backward()
    through_packed = x.grad.clone()
    x.grad = None
    (plain(x) ** 2).sum().backward()
    torch.testing.assert_close(through_packed, x.grad, atol=1e-5, rtol=1e-5)


def test_only_large_linears_of_a_packable_dtype_are_packed() -> None:
    model = nn.Sequential(linear(96, 320), nn.Sequential(linear(32, 32)), linear(96, 320).to(torch.float64))
    assert pack_linears(model, min_elements=96 * 320) == 1
    assert isinstance(model[0], PackedLinear)
    assert type(model[1][0]) is nn.Linear and type(model[2]) is nn.Linear


def test_each_plain_weight_is_let_go_as_soon_as_it_is_packed() -> None:
    """Walking the modules keeps the old ones referenced until the walk ends; their weights must not wait for
    it, or loading would peak at the span twice (250m, 8 layers: 1055 MiB instead of 731)."""
    model = nn.Sequential(linear(96, 320), linear(320, 96))
    held = list(model)  # as the walk over `modules()` holds them
    weights = [weakref.ref(module.weight) for module in held]
    assert pack_linears(model, min_elements=0) == 2
    assert all(weight() is None for weight in weights)


def test_a_loaded_span_packs_its_large_linears_unless_it_compiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`torch.compile` cannot trace oneDNN's packed tensors, so a compiled span keeps plain layers."""
    monkeypatch.setattr("swarm.models.packed.PACK_MIN_ELEMENTS", 0)
    checkpoint = build_tiny("llama", tmp_path / "llama")
    span = LoadedSpan.load(checkpoint, 0, 2, CPU, torch.float32, show_progress=False)
    kinds = {type(module) for module in span.stack.modules() if isinstance(module, nn.Linear | PackedLinear)}
    assert kinds == {PackedLinear}
    compiled = LoadedSpan.load(checkpoint, 0, 2, CPU, torch.float32, show_progress=False, compile=True)
    assert not any(isinstance(module, PackedLinear) for module in compiled.stack.modules())
    assert span.weight_bytes == compiled.weight_bytes  # packed in place of the plain weights, not beside them


@pytest.mark.parametrize(("family", "packed"), [("llama", True), ("qwen2", False)], ids=["untied", "tied"])
def test_the_clients_head_is_packed_unless_it_is_the_embedding(
    family: str, packed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tied head shares the embedding's tensor: a packed copy would hold the largest weight twice."""
    monkeypatch.setattr("swarm.models.packed.PACK_MIN_ELEMENTS", 0)
    checkpoint = build_tiny(family, tmp_path / family)
    local = LocalModules.load(checkpoint, ModelArchitecture.of(checkpoint), torch.float32)
    assert isinstance(local.head, PackedLinear) is packed


def test_a_packed_spans_backward_equals_a_plain_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training passes through a node's packed layers: gradients go through the weights read back plain."""
    checkpoint = build_tiny("llama", tmp_path / "llama")
    plain = LoadedSpan.load(checkpoint, 0, 2, CPU, torch.float32, show_progress=False)
    assert not any(isinstance(module, PackedLinear) for module in plain.stack.modules())
    monkeypatch.setattr("swarm.models.packed.PACK_MIN_ELEMENTS", 0)
    packed = LoadedSpan.load(checkpoint, 0, 2, CPU, torch.float32, show_progress=False)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, plain.hidden_size, generator=generator)
    grad_output = torch.randn(2, 5, plain.hidden_size, generator=generator)
    positions = torch.arange(5).expand(2, 5)
    expected, _ = plain.backward(hidden, positions, None, grad_output, 0, 2)
    got, _ = packed.backward(hidden, positions, None, grad_output, 0, 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
