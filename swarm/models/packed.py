"""Linear layers whose weights are laid out once, at load, for oneDNN's CPU matrix kernels.

A float32 `F.linear` on CPU goes to MKL's sgemm, which copies (packs) the whole weight into its own panel
layout on every call: with a handful of rows, that copy costs more than the arithmetic (perf on a node serving
16 sessions of the 250m preset: 52% of its CPU in `sgemm_scopy`, 27% in the multiply kernel). oneDNN's inner
product reads a weight reordered once into its blocked layout instead, so rounds of several tokens run 2-8x
faster and single tokens 1.2-2.7x on one thread (`tests/swarm/models/test_packed.py` checks the equality;
`bench/linear.py` measures the speed).

bfloat16 (and float16) `F.linear` already runs on oneDNN, but reorders the weight on every call; packed once,
it computes the same bits 1.2-4x faster with up to 64 rows.

The packed tensor replaces the plain weight, so memory stays the same. Small weights stay plain: oneDNN's
fixed cost per call (~12 µs) outweighs its gain below about a million elements. A gradient pass (the node's
backward, the client's soft-prompt training) runs `F.linear` on the weight read back to plain layout, which
oneDNN gives back bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_MIN_ELEMENTS = 1 << 20
"""Weights with fewer elements (output x input) than this stay plain `nn.Linear`s (see the module docstring)."""

ROWS_HINT = 16
"""The row count oneDNN lays the weight out for; any count works, and 16 beat 1 at every count from 1 to 64."""


def packing_available() -> bool:
    """oneDNN on an x86 CPU (ARM builds route it through ACL, which this path has not been measured on)."""
    return torch.backends.mkldnn.is_available() and not torch.ops.mkldnn._is_mkldnn_acl_supported()


def packable_dtypes() -> set[torch.dtype]:
    """float32 always; the half-width types where this CPU has oneDNN kernels for them."""
    dtypes = {torch.float32}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.add(torch.bfloat16)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        dtypes.add(torch.float16)
    return dtypes


class PackedLinear(nn.Module):
    """`y = x W^T + b` through oneDNN with `W` reordered once; the same results as `nn.Linear` to float32
    rounding (the order of the additions differs)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """The weight in plain layout (a copy: for callers that read it, such as a weight-tying check)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module, min_elements: int | None = None) -> int:
    """Replace every CPU `nn.Linear` inside `module` whose weight is of a `packable_dtypes()` dtype and has at
    least `min_elements` elements (default `PACK_MIN_ELEMENTS`) by a `PackedLinear`; returns how many were
    replaced. Quantized weights (tensor subclasses), other dtypes and other devices are left as they are, and so
    is everything where oneDNN is not available."""
    if not packing_available():
        return 0
    least = PACK_MIN_ELEMENTS if min_elements is None else min_elements
    dtypes = packable_dtypes()
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and _packable(child.weight, dtypes, least):
                setattr(parent, name, PackedLinear(child))
                child.weight = None  # `modules()` still holds the old module: free its plain weight now, not at the end
                replaced += 1
    return replaced


def _packable(weight: torch.Tensor, dtypes: set[torch.dtype], min_elements: int) -> bool:
    return (
        type(weight.data) is torch.Tensor
        and weight.dtype in dtypes
        and weight.device.type == "cpu"
        and weight.numel() >= min_elements
    )
