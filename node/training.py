"""`backward`: the gradient of a stateless pass over part of the span, for clients that train through the swarm.

A client tuning a soft prompt or a low-rank adapter sends, for each span of its chain, the hidden states that
entered it and the gradient of its loss with respect to what came out; the node runs the layers again (keeping
one layer's activations at a time) and answers with the gradient with respect to the input hidden states and to
the adapter it was given. The node's weights never change, so training needs nothing a node keeps between
requests, and any peer serving the layers can answer.

A backward costs a few forwards, so it is bounded harder than a forward (`--max-training-tokens`), runs one at
a time, and runs on a worker thread (torch releases the GIL while it computes), so the event loop keeps
answering sessions' steps and heartbeats meanwhile. An operator who lends layers for inference only starts the
node with `--no-training`: `backward` is then refused with `not_offered`, and the node announces
`training: false` so that clients route training elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import torch

from swarm.errors import ErrorCode, ProtocolError
from swarm.node.metrics import NodeMetrics
from swarm.node.span import LoadedSpan
from swarm.node.validation import PassLimits, decode_grad_output
from swarm.protocol import AdapterPair, Backward, BackwardResult, WireTensor
from swarm.tensors import WIRE_DTYPES


class BackwardService:
    """Answers `backward` frames for one node: `span` as `StepService` gets it; `enabled` is off under
    `--no-training`; `limits` bound what one backward carries (`--max-training-tokens`)."""

    def __init__(self, span: Callable[[], LoadedSpan], enabled: bool, limits: PassLimits, metrics: NodeMetrics) -> None:
        self.span = span
        self.enabled = enabled
        self.limits = limits
        self.metrics = metrics
        self._computing = asyncio.Lock()

    async def answer(self, message: Backward) -> BackwardResult:
        if not self.enabled:
            raise ProtocolError(
                ErrorCode.NOT_OFFERED, "this node serves inference only (started with --no-training); no backward"
            )
        span = self.span()
        inputs, adapter = self.limits.decode(message, span.architecture.spec, (span.start, span.end))
        grad_output = decode_grad_output(message.grad_output, inputs.hidden)
        async with self._computing:
            began = time.perf_counter()
            grad_hidden, adapter_grads = await asyncio.to_thread(
                span.backward,
                inputs.hidden,
                inputs.position_ids,
                inputs.attention_mask,
                grad_output,
                message.start,
                message.end,
                adapter,
            )
            self.metrics.step_seconds.observe(time.perf_counter() - began)
        self.metrics.steps.labels("backward").inc()
        dtype = WIRE_DTYPES[message.hidden.dtype]
        pairs = []
        if message.adapter is not None:
            grads = iter(adapter_grads)
            for pair in message.adapter.pairs:
                grad_a, grad_b = next(grads), next(grads)
                pairs.append(
                    AdapterPair(
                        layer=pair.layer,
                        target=pair.target,
                        a=WireTensor.from_torch(_as(grad_a, pair.a.dtype)),
                        b=WireTensor.from_torch(_as(grad_b, pair.b.dtype)),
                    )
                )
        return BackwardResult(grad_hidden=WireTensor.from_torch(grad_hidden.to("cpu", dtype)), adapter_grads=pairs)


def _as(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    return tensor.to("cpu", WIRE_DTYPES[dtype])
