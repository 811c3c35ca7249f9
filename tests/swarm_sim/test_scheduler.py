"""`DecodeScheduler`: concurrent generation jobs share ticks and frames, and each still gets exactly what
local greedy `generate` gives it alone, also when a job fails or a peer dies under them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

import swarm.client.core.scheduler
from swarm.client import DistributedModelForCausalLM
from swarm.client.core.channel import PeerChannel
from swarm.client.core.scheduler import DecodeScheduler
from swarm.client.core.sessions import ChainSession
from swarm.client.local_swarm import LocalSwarm, Process
from swarm.protocol import Step, StepResult
from tests.processors import AtStep

PROMPTS = [
    [1, 45, 67, 89, 120, 33],
    [1, 300, 8],
    [1, 250, 7, 99, 14, 300, 8, 5, 17, 240, 61],
    [1, 12],
    [1, 77, 78, 79, 80],
    [1, 9, 99, 199],
]
NEW_TOKENS = [12, 20, 7, 16, 25, 10]


@pytest.fixture(scope="module")
def nodes(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalSwarm, list[Process]]]:
    """tiny-llama as 0-3 plus two nodes for 4-7, so a job can lose the one it uses."""
    with LocalSwarm(tmp_path_factory.mktemp("scheduler")) as swarm:
        swarm.start_registry()
        started = [swarm.start_node(tiny_llama, "0-3"), swarm.start_node(tiny_llama, "4-7")]
        started.append(swarm.start_node(tiny_llama, "4-7"))
        swarm.wait_ready("tiny-llama")
        yield swarm, started


@pytest.fixture(scope="module")
def model(tiny_llama: Path, nodes: tuple[LocalSwarm, list[Process]]) -> Iterator[DistributedModelForCausalLM]:
    swarm, _ = nodes
    loaded = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=swarm.registry_url)
    yield loaded
    loaded.close()


@pytest.fixture
def scheduler(model: DistributedModelForCausalLM) -> Iterator[DecodeScheduler]:
    running = DecodeScheduler(model)
    yield running
    running.close()


def local_greedy(local: PreTrainedModel, prompt: list[int], new_tokens: int) -> list[int]:
    output = local.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return output[0].tolist()


def run_concurrently(calls: list[Callable[[], torch.Tensor]]) -> list[torch.Tensor | BaseException]:
    results: list[torch.Tensor | BaseException] = [RuntimeError("never ran")] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = calls[index]()
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def job(scheduler: DecodeScheduler, prompt: list[int], new_tokens: int, *processors: LogitsProcessor) -> Callable:
    return lambda: scheduler.generate(
        torch.tensor([prompt]),
        max_new_tokens=new_tokens,
        logits_processor=LogitsProcessorList(processors),
        eos_token_id=2,
        pad_token_id=0,
    )


def test_concurrent_jobs_of_different_lengths_each_get_their_local_greedy_tokens(
    scheduler: DecodeScheduler,
    model: DistributedModelForCausalLM,
    local_llama: PreTrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group_frames: list[int] = []  # per tick: the frames its decode steps may take, one per peer they go to next
    step_together = swarm.client.core.scheduler.step_together

    async def counted(sessions: list[ChainSession], *inputs: torch.Tensor) -> list:
        group_frames.append(len({(id(link.channel), link.link.start) for s in sessions for link in s.links}))
        return await step_together(sessions, *inputs)

    monkeypatch.setattr(swarm.client.core.scheduler, "step_together", counted)
    channels = model.channels.channels
    frames_before = sum(channel.frames_sent for channel in channels)
    steps_before = sum(channel.steps_sent for channel in channels)
    results = run_concurrently([job(scheduler, p, n) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)])
    for result, prompt, new_tokens in zip(results, PROMPTS, NEW_TOKENS, strict=True):
        assert isinstance(result, torch.Tensor), result
        assert result[0].tolist() == local_greedy(local_llama, prompt, new_tokens)
    assert scheduler.ticks <= 2 * max(NEW_TOKENS) + len(PROMPTS) < sum(NEW_TOKENS), "jobs should share ticks"
    channels = model.channels.channels
    frames = sum(channel.frames_sent for channel in channels) - frames_before
    steps = sum(channel.steps_sent for channel in channels) - steps_before
    # every token crosses both nodes; a job's prompt goes on from the first node to the second by itself
    # (node-to-node forwarding), so the client sends it once
    assert steps >= 2 * sum(NEW_TOKENS) - len(PROMPTS), "every token crosses both nodes"
    # a tick's decode steps take one frame per peer (the two 4-7 nodes may each serve some of the jobs), and
    # each job's prompt takes one frame per hop
    assert frames <= sum(group_frames) + 2 * len(PROMPTS) < steps, "a tick's steps should travel together"


def test_a_lanes_decode_steps_travel_to_each_peer_as_one_frame(
    scheduler: DecodeScheduler, local_llama: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    send = PeerChannel.step

    async def counted(channel: PeerChannel, message: Step) -> StepResult:
        sizes.append(len(message.session_ids))
        return await send(channel, message)

    monkeypatch.setattr(PeerChannel, "step", counted)
    jobs = [job(scheduler, prompt, 14) for prompt in PROMPTS[:4]]
    for result, prompt in zip(run_concurrently(jobs), PROMPTS, strict=False):
        assert isinstance(result, torch.Tensor) and result[0].tolist() == local_greedy(local_llama, prompt, 14)
    assert sizes and max(sizes) >= 2, "a lane's decode steps should go to each peer as one frame"


def test_a_job_joining_late_and_a_padded_batch_job_match_local_generate(
    scheduler: DecodeScheduler, local_llama: PreTrainedModel
) -> None:
    joined = threading.Event()

    rows = torch.tensor([[0, 0, 1, 45, 67], [1, 300, 8, 5, 17]])
    mask = (rows != 0).long()
    mask[1, 0] = 1

    def late() -> torch.Tensor:
        joined.wait(timeout=30)
        return scheduler.generate(rows, mask, max_new_tokens=9, eos_token_id=2, pad_token_id=0)

    first, second = run_concurrently([job(scheduler, PROMPTS[0], 24, AtStep(5, joined.set)), late])
    assert isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
    assert first[0].tolist() == local_greedy(local_llama, PROMPTS[0], 24)
    expected = local_llama.generate(rows, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    assert second.tolist() == expected.tolist()


def test_a_failing_job_ends_alone(scheduler: DecodeScheduler, local_llama: PreTrainedModel) -> None:
    class Broken(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if input_ids.shape[1] > 8:
                raise ValueError("processor broke")
            return scores

    broken, healthy = run_concurrently([job(scheduler, PROMPTS[0], 10, Broken()), job(scheduler, PROMPTS[1], 15)])
    assert isinstance(broken, ValueError)
    assert isinstance(healthy, torch.Tensor) and healthy[0].tolist() == local_greedy(local_llama, PROMPTS[1], 15)


def test_a_prompt_outside_the_vocabulary_is_refused_before_it_reaches_the_loop(scheduler: DecodeScheduler) -> None:
    with pytest.raises(ValueError, match="ids in the vocabulary"):
        scheduler.generate(torch.tensor([[1, 10**6]]), max_new_tokens=3)


def test_jobs_survive_the_loss_of_the_peer_they_use(
    scheduler: DecodeScheduler,
    model: DistributedModelForCausalLM,
    nodes: tuple[LocalSwarm, list[Process]],
    local_llama: PreTrainedModel,
) -> None:
    _, started = nodes
    killed: list[Process] = []

    def kill_a_node_in_use() -> None:
        in_use = {channel.address for channel in model.channels.channels if channel.alive}
        victim = next(node for node in started[1:] if node.address in in_use and node.alive())
        victim.kill()
        killed.append(victim)

    killer = job(scheduler, PROMPTS[0], 30, AtStep(6, kill_a_node_in_use))
    results = run_concurrently([killer] + [job(scheduler, p, 30) for p in PROMPTS[1:4]])
    assert killed, "a node serving layers 4-7 should have been killed"
    for result, prompt in zip(results, PROMPTS[:4], strict=True):
        assert isinstance(result, torch.Tensor), result
        assert result[0].tolist() == local_greedy(local_llama, prompt, 30)
