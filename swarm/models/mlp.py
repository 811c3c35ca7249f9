"""The feed-forward half of a layer: a dense MLP (gated or plain) or a mixture of experts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from swarm.models.linear import linear_from, make_linear
from swarm.models.spec import ModelSpec

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class DenseMLP(nn.Module):
    """gated: down(act(gate(x)) * up(x)), gate and up fused in one projection; plain: down(act(up(x)))."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.gated = spec.mlp == "gated"
        self.up = make_linear(weights, "gate_up" if self.gated else "up")
        self.down = make_linear(weights, "down")
        self.act = ACTIVATIONS[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.up.forward(x).chunk(2, dim=-1)
            return self.down.forward(self.act(gate) * up)
        return self.down.forward(self.act(self.up.forward(x)))


class MixtureOfExperts(nn.Module):
    """A router scores every expert per token; the `top_k` best (softmax weights, renormalized when the family
    does) each run a gated MLP on that token, and their outputs add up weighted. The checkpoint's experts arrive
    stacked in two tensors, [experts, 2 * intermediate, hidden] (gate then up) and [experts, hidden,
    intermediate]; each expert's slices become `nn.Linear`s, so that int8 quantization and the CPU's packed
    layout reach the experts as they reach a dense MLP."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        assert spec.moe is not None  # only built for MoE layers (a programming error, not input)
        self.moe = spec.moe
        self.router = nn.Parameter(weights["router.weight"], requires_grad=False)
        self.gate_up = nn.ModuleList(linear_from(weight) for weight in weights["experts.gate_up"])
        self.down = nn.ModuleList(linear_from(weight) for weight in weights["experts.down"])
        self.act = ACTIVATIONS[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = F.linear(tokens, self.router)
        probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probabilities, self.moe.top_k, dim=-1)
        if self.moe.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.moe.weights_in_input_dtype:
            weights = weights.to(tokens.dtype)
        out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)  # one rounding at the end
        by_slot = chosen.t()
        for expert in chosen.unique().tolist():  # in the reference's order: experts, then slots, then tokens
            slot, token_rows = torch.where(by_slot == expert)
            gate, up = self.gate_up[expert].forward(tokens[token_rows]).chunk(2, dim=-1)
            expert_out = self.down[expert].forward(self.act(gate) * up) * weights[token_rows, slot, None]
            out.index_add_(0, token_rows, expert_out.float())
        return out.to(tokens.dtype).reshape(shape)
