"""Choosing a node's span: explicit ranges are checked, `auto` fills the swarm's weakest layers."""

from __future__ import annotations

import pytest

from swarm.errors import SwarmError
from swarm.memory import ModelFootprint
from swarm.node.plan import plan_span
from tests.swarm.test_routing import peer

FOOTPRINT = ModelFootprint(num_layers=8, layer_params=[1000] * 8, local_params=500, kv_values_per_token_per_layer=10)
PER_LAYER = 1000 * 4 + 100 * 10 * 4  # float32 weights + KV cache for 100 tokens


def test_auto_takes_as_many_layers_as_fit_where_coverage_is_weakest() -> None:
    plan = plan_span(FOOTPRINT, "auto", 3 * PER_LAYER, "float32", 100, [peer("a", 0, 4)])
    assert (plan.start, plan.end) == (4, 7)
    assert plan.weight_bytes == 3 * 4000 and plan.cache_bytes == 3 * 4000
    assert "layers 4-6 (3 of 8)" in plan.describe(8, "float32", 100)


def test_auto_in_an_empty_swarm_starts_at_layer_zero_and_can_take_everything() -> None:
    plan = plan_span(FOOTPRINT, "auto", 100 * PER_LAYER, "float32", 100, [])
    assert (plan.start, plan.end) == (0, 8)


def test_plans_that_cannot_fit_are_refused_with_the_numbers() -> None:
    with pytest.raises(SwarmError, match="not even one layer"):
        plan_span(FOOTPRINT, "auto", PER_LAYER - 1, "float32", 100, [])
    with pytest.raises(SwarmError, match="more than --max-memory"):
        plan_span(FOOTPRINT, "0-3", 3 * PER_LAYER, "float32", 100, [])
    with pytest.raises(SwarmError, match="outside the model"):
        plan_span(FOOTPRINT, "6-9", None, "float32", 100, [])
    assert plan_span(FOOTPRINT, "2-3", None, "float32", 100, []).start == 2
