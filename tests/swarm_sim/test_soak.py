"""A bounded soak: 16 concurrent sessions while nodes are killed and restarted at random."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm

SESSIONS = 16
NEW_TOKENS = 30
CHAOS_SECONDS = 60.0


def prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 400, (1, 6 + i % 5), generator=generator) for i in range(SESSIONS)]


def test_sixteen_sessions_survive_a_minute_of_random_node_deaths(
    tiny_llama: Path, tmp_path: Path, local_llama: PreTrainedModel
) -> None:
    inputs = prompts()
    expected = [local_llama.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() for p in inputs]
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_registry()
        replicas = {span: [swarm.start_node(tiny_llama, span) for _ in range(2)] for span in ("0-3", "4-7")}
        swarm.wait_ready("tiny-llama")
        model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=swarm.registry_url, failover_wait=90.0)
        stop = threading.Event()
        rounds = [0] * SESSIONS
        failures: list[str] = []

        def session(index: int) -> None:
            while not stop.is_set() or rounds[index] == 0:
                try:
                    output = model.generate(inputs[index], max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
                except Exception as exc:
                    failures.append(f"session {index}: {type(exc).__name__}: {exc}")
                    return
                if output != expected[index]:
                    failures.append(f"session {index} round {rounds[index]}: output differs")
                    return
                rounds[index] += 1

        workers = [threading.Thread(target=session, args=(i,)) for i in range(SESSIONS)]
        for worker in workers:
            worker.start()
        chaos = random.Random(2026)
        kills = 0
        deadline = time.monotonic() + CHAOS_SECONDS
        while time.monotonic() < deadline and not failures:
            time.sleep(chaos.uniform(0.5, 2.0))
            span = chaos.choice(sorted(replicas))
            index = chaos.randrange(2)
            victim = replicas[span][index]
            victim.kill()  # the other replica of the span keeps serving; this one comes back shortly
            kills += 1
            time.sleep(1.0)
            replicas[span][index] = swarm.restart(victim)
            swarm.wait_online(replicas[span][index], timeout=60)
        stop.set()
        for worker in workers:
            worker.join(timeout=180)
        model.close()
        assert not any(worker.is_alive() for worker in workers), "a session hung"
    assert not failures, failures
    assert kills >= 4  # a restarted node needs several seconds to load and announce
    assert all(count >= 1 for count in rounds), rounds


pytestmark = pytest.mark.slow
