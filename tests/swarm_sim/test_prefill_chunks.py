"""Nodes that compute prompts in 3-token chunks still give exactly local `generate()`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm


def test_greedy_generation_with_tiny_prefill_chunks_matches_local_generate(
    tiny_llama: Path, tmp_path: Path, local_llama: PreTrainedModel
) -> None:
    short, long = [1, 500, 400, 300], [1, 45, 67, 89, 120, 33, 250, 7, 99, 14, 300]
    batch = torch.tensor([[0] * (len(long) - len(short)) + short, long])
    mask = torch.tensor([[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)])
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_registry()
        for layers in ("0-3", "4-7"):
            swarm.start_node(tiny_llama, layers, "--prefill-chunk", "3")
        swarm.wait_ready("tiny-llama")
        model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=swarm.registry_url)
        try:
            remote = model.generate(batch, **kwargs)
        finally:
            model.close()
    assert remote.tolist() == local_llama.generate(batch, **kwargs).tolist()
