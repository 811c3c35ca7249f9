"""A lying node, for span verification's tests: `swarm-node` whose span answers wrongly.

Run as `python tests/swarm_sim/lying_node.py <swarm-node flags>` with `LIE` in the environment:
`noise` adds 10% Gaussian noise to every answer, `constant` answers a constant vector, `nan` answers NaN, and
`every:N` adds the noise to every N-th answer only, `narrow` answers half the hidden size, `slow:SECONDS` answers
honestly after sleeping that long, and `none` answers honestly. It also claims an absurd
throughput, so that planners try it first. Nothing else differs from an honest node: same flags, same protocol,
same identity.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from swarm.node.main import main
from swarm.node.span import LoadedSpan

MODE = os.environ.get("LIE", "noise")
_answers = 0


def lie(output: torch.Tensor) -> torch.Tensor:
    global _answers
    _answers += 1
    if MODE == "none":
        return output
    if MODE.startswith("slow:"):
        time.sleep(float(MODE.split(":", 1)[1]))
        return output
    if MODE.startswith("every:") and _answers % int(MODE.split(":", 1)[1]):
        return output
    if MODE == "constant":
        return torch.full_like(output, 0.5)
    if MODE == "nan":
        return torch.full_like(output, float("nan"))
    if MODE == "narrow":
        return output[..., : output.shape[-1] // 2].contiguous()
    scale = output.float().std(dim=-1, keepdim=True)
    return (output.float() + 0.1 * scale * torch.randn(output.shape)).to(output.dtype)


def lying(method):  # type: ignore[no-untyped-def]
    def wrapped(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return lie(method(self, *args, **kwargs))

    return wrapped


LoadedSpan.run_round = lying(LoadedSpan.run_round)  # type: ignore[method-assign]
LoadedSpan.forward_stateless = lying(LoadedSpan.forward_stateless)  # type: ignore[method-assign]
LoadedSpan.measure_throughput = lambda self, repeats=5: 1e8  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
