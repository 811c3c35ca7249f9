"""How span verification compares two answers: tolerance by dtype and depth, relative error per token."""

from __future__ import annotations

import math

import torch

from swarm.client.core.planner import ChainPlanner
from swarm.client.core.verify import MAX_TOLERANCE, Verifier, relative_error, tolerance


def test_tolerance_grows_with_depth_and_coarser_dtypes_and_stays_below_a_real_perturbation() -> None:
    assert tolerance({"float32"}, 4) < tolerance({"float32"}, 16) < tolerance({"bfloat16"}, 16)
    assert tolerance({"float32", "bfloat16"}, 4) == tolerance({"bfloat16"}, 4)
    assert tolerance({"bfloat16"}, 80) == MAX_TOLERANCE < 0.1  # 10% noise is always a disagreement


def test_relative_error_is_per_token_and_infinite_for_non_finite_answers() -> None:
    reference = torch.ones(1, 3, 8)
    off = reference.clone()
    off[0, 1] *= 1.1  # one token 10% off
    assert math.isclose(relative_error(off, reference), 0.1, rel_tol=1e-5)
    assert relative_error(reference, reference) == 0
    nan = reference.clone()
    nan[0, 2, 0] = float("nan")
    assert relative_error(nan, reference) == math.inf


class _Link:
    def __init__(self, peer_id: str, hypo: bool = False) -> None:
        self.link = type("L", (), {"peer": type("P", (), {"peer_id": peer_id})()})()
        self.reordered = hypo  # a step of its history carried beam search's hypo_ids


def test_new_peers_are_always_checked_known_ones_at_the_rate_and_none_when_off() -> None:
    planner = ChainPlanner(["ws://127.0.0.1:9"], "m", 8, verify_rate=0.25)
    verifier = Verifier(planner)
    assert verifier.wants(_Link("new"))  # type: ignore[arg-type]
    planner.proven.add("known")
    sampled = sum(verifier.wants(_Link("known")) for _ in range(4000))  # type: ignore[arg-type]
    assert 800 < sampled < 1200
    assert not verifier.wants(_Link("new", hypo=True))  # type: ignore[arg-type]  # beam reorders: not one sequence
    planner.verify_rate = 0
    assert not verifier.wants(_Link("new"))  # type: ignore[arg-type]
