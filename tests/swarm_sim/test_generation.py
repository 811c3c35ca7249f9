"""Generation through a real swarm equals local `transformers` on the same checkpoint."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm
from swarm.errors import MissingLayersError
from swarm.transport import Credentials

pytestmark = pytest.mark.oracle  # also run against the lowest transformers allowed (.ci/run)

PROMPT = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7, 99, 14, 300, 8]])


def test_greedy_generation_matches_local_generate_token_for_token(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel
) -> None:
    kwargs = dict(max_new_tokens=40, do_sample=False, return_dict_in_generate=True, output_logits=True)
    remote = swarm_llama.generate(PROMPT, **kwargs)
    local = local_llama.generate(PROMPT, **kwargs)
    assert remote.sequences.tolist() == local.sequences.tolist()
    for remote_logits, local_logits in zip(remote.logits, local.logits, strict=True):
        torch.testing.assert_close(remote_logits, local_logits, atol=1e-4, rtol=0)


def test_plain_forward_returns_local_logits(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel
) -> None:
    with torch.no_grad():
        expected = local_llama(PROMPT).logits
    torch.testing.assert_close(swarm_llama(PROMPT).logits, expected, atol=1e-4, rtol=0)


def test_seeded_sampling_matches_local_sampling(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel
) -> None:
    kwargs = dict(max_new_tokens=30, do_sample=True, temperature=0.9, top_k=40, top_p=0.95)
    torch.manual_seed(1234)
    remote = swarm_llama.generate(PROMPT, **kwargs)
    torch.manual_seed(1234)
    local = local_llama.generate(PROMPT, **kwargs)
    assert remote.tolist() == local.tolist()


def test_two_clients_at_once_each_get_their_own_output(
    tiny_llama: Path, llama_swarm: LocalSwarm, local_llama: PreTrainedModel
) -> None:
    prompts = [PROMPT, torch.tensor([[1, 500, 400, 300, 200, 100, 50]])]
    expected = [local_llama.generate(p, max_new_tokens=30, do_sample=False).tolist() for p in prompts]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def client(index: int) -> None:
        model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=llama_swarm.registry_url)
        try:
            results[index] = model.generate(prompts[index], max_new_tokens=30, do_sample=False).tolist()
        except BaseException as exc:
            errors.append(exc)
        finally:
            model.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert [results[0], results[1]] == expected


def test_left_padded_batch_equals_each_prompt_alone(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel
) -> None:
    short, long = [1, 500, 400, 300], [1, 45, 67, 89, 120, 33, 250, 7]
    batch = torch.tensor([[0] * (len(long) - len(short)) + short, long])
    mask = torch.tensor([[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)])
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    together = swarm_llama.generate(batch, attention_mask=mask, **kwargs)
    alone = [swarm_llama.generate(torch.tensor([p]), **kwargs)[0, len(p) :] for p in (short, long)]
    assert together[0, len(long) :].tolist() == alone[0].tolist()
    assert together[1, len(long) :].tolist() == alone[1].tolist()
    assert together.tolist() == local_llama.generate(batch, attention_mask=mask, **kwargs).tolist()


def test_overlapping_nodes_combine_into_one_chain(
    tiny_llama: Path, llama_swarm: LocalSwarm, local_llama: PreTrainedModel
) -> None:
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, registry=llama_swarm.registry_url, model_name="tiny-overlap"
    )
    try:
        chain = model.runner.run(model.planner.plan())
        assert [link.peer.start for link in chain] == [0, 3]
        assert chain[0].end == chain[1].start
        remote = model.generate(PROMPT, max_new_tokens=20, do_sample=False)
    finally:
        model.close()
    assert remote.tolist() == local_llama.generate(PROMPT, max_new_tokens=20, do_sample=False).tolist()


def test_missing_layers_fail_fast_with_the_uncovered_range(tiny_llama: Path, llama_swarm: LocalSwarm) -> None:
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, registry=llama_swarm.registry_url, model_name="tiny-partial"
    )
    started = time.monotonic()
    try:
        with pytest.raises(MissingLayersError) as info:
            model.generate(PROMPT, max_new_tokens=5, do_sample=False)
    finally:
        model.close()
    assert time.monotonic() - started < 15
    assert info.value.missing == [(4, 8)]
    assert "tiny-partial" in str(info.value) and "layers 4-7" in str(info.value)


def test_a_session_is_freed_on_the_nodes_after_generate(
    swarm_llama: DistributedModelForCausalLM, llama_swarm: LocalSwarm
) -> None:
    swarm_llama.generate(PROMPT, max_new_tokens=3, do_sample=False)
    from swarm.client.core.planner import fetch_peers

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        peers = swarm_llama.runner.run(fetch_peers([llama_swarm.registry_url], "tiny-llama", Credentials()))
        if all(peer.sessions == 0 and peer.cache_tokens_free == peer.cache_tokens_total for peer in peers):
            return
        time.sleep(0.5)
    pytest.fail(f"sessions still open on the nodes: {peers}")


def test_a_second_generate_continues_the_same_session(
    swarm_llama: DistributedModelForCausalLM, local_llama: PreTrainedModel
) -> None:
    reply = torch.tensor([[20, 21, 22]])
    with swarm_llama.inference_session(max_length=128) as session:
        first = swarm_llama.generate(PROMPT, max_new_tokens=10, do_sample=False, past_key_values=session)
        seen_after_first = session.get_seq_length()
        second = swarm_llama.generate(
            torch.cat([first, reply], 1), max_new_tokens=10, do_sample=False, past_key_values=session
        )
        assert session.get_seq_length() == second.shape[1] - 1
    assert seen_after_first == first.shape[1] - 1
    local_first = local_llama.generate(PROMPT, max_new_tokens=10, do_sample=False)
    local_second = local_llama.generate(torch.cat([local_first, reply], 1), max_new_tokens=10, do_sample=False)
    assert first.tolist() == local_first.tolist()
    assert second.tolist() == local_second.tolist()


def test_concurrent_sessions_of_different_lengths_batched_on_the_nodes_stay_exact(
    tiny_llama: Path, llama_swarm: LocalSwarm, local_llama: PreTrainedModel
) -> None:
    import urllib.request

    prompts = [
        torch.randint(3, 400, (1, length), generator=torch.Generator().manual_seed(length))
        for length in (3, 9, 17, 30, 5, 12)
    ]
    expected = [local_llama.generate(p, max_new_tokens=25, do_sample=False).tolist() for p in prompts]
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=llama_swarm.registry_url)
    results: dict[int, list] = {}
    try:
        threads = [
            threading.Thread(
                target=lambda i=i: results.__setitem__(
                    i, model.generate(prompts[i], max_new_tokens=25, do_sample=False).tolist()
                )
            )
            for i in range(len(prompts))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        model.close()
    assert [results.get(i) for i in range(len(prompts))] == expected
    nodes = [p for p in llama_swarm.processes if "swarm.node.main" in p.args and "--model-name" not in p.args]
    metrics = [
        urllib.request.urlopen(n.address.replace("ws://", "http://") + "/metrics", timeout=10).read().decode()
        for n in nodes
    ]
    batched = [
        float(line.split()[-1])
        for text in metrics
        for line in text.splitlines()
        if line.startswith("swarm_node_batched_steps_total")
    ]
    assert sum(batched) > 0, "no decode steps were batched; the test did not exercise batching"
