"""The Python client refuses a sequence longer than the model's positions before anything reaches a peer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.client import DistributedModelForCausalLM
from swarm.client.core.scheduler import DecodeScheduler


def test_a_prompt_past_the_models_positions_is_refused_with_the_numbers(tiny_llama: Path) -> None:
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry="ws://127.0.0.1:9")  # never reached
    try:
        too_long = torch.ones(1, 513, dtype=torch.long)  # tiny-llama has 512 positions
        with pytest.raises(ValueError, match="position 512, but tiny-llama has 512 positions"):
            model(too_long)
        scheduler = DecodeScheduler(model)
        with pytest.raises(ValueError, match="512 positions"):
            scheduler.generate(torch.ones(1, 500, dtype=torch.long), max_new_tokens=20)
        scheduler.close()
    finally:
        model.close()
