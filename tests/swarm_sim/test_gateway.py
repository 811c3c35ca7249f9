"""The HTTP gateway (`swarm-client serve`) as a real process, used through the official `openai` client and
plain HTTP: OpenAI completions and chat, streaming, `/generate`, and errors that leave it serving."""

from __future__ import annotations

import http.client
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from swarm.client.local_swarm import LocalSwarm, Process, wait_for_port
from swarm.client.serve.chat_template import chat_prompt_ids, render_chat

API_KEY = "sim-secret"
PROMPTS = ["Once upon a time", "The little dragon looked at the sky and"]


def start_gateway(swarm: LocalSwarm, checkpoint: Path, *extra: str) -> Process:
    """`swarm-client serve` on a free port; `process.address` is its base URL."""
    port = swarm.new_port()
    args = [
        sys.executable,
        "-m",
        "swarm.client.cli.main",
        "serve",
        "--model",
        str(checkpoint),
        "--registry",
        swarm.registry_url,
    ]
    process = swarm.spawn(f"gateway-{port}", [*args, "--port", str(port), "--api-key", API_KEY, *extra])
    process.address = f"http://127.0.0.1:{port}"
    wait_for_port(port, process, timeout=120)
    return process


@pytest.fixture(scope="module")
def gateway(tiny_llama: Path, llama_swarm: LocalSwarm) -> Iterator[str]:
    process = start_gateway(llama_swarm, tiny_llama)
    yield process.address
    process.kill()


@pytest.fixture(scope="module")
def api(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_llama)


def local_continuation(model: PreTrainedModel, ids: list[int], max_new: int, **kwargs: object) -> list[int]:
    """Greedy tokens after `ids` from the local model, up to (without) the end of sequence."""
    output = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=0, **kwargs)
    new = output[0, len(ids) :].tolist()
    return new[: new.index(2)] if 2 in new else new


def local_text(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[int], max_new: int, **kwargs: object
) -> str:
    return tokenizer.decode(local_continuation(model, ids, max_new, **kwargs), skip_special_tokens=True)


def local_logprobs(model: PreTrainedModel, ids: list[int]) -> list[float]:
    """Log-probability of each token after the first, from one local forward."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def node_metric(node_address: str, name: str) -> float:
    text = urllib.request.urlopen(node_address.replace("ws://", "http://") + "/metrics", timeout=10).read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0  # a labelled counter appears at its first count


def post(url: str, body: dict[str, object], key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_endpoint_names_the_served_model(api: openai.OpenAI) -> None:
    assert [model.id for model in api.models.list()] == ["tiny-llama"]


def test_greedy_completions_equal_local_generate_with_logprobs(
    api: openai.OpenAI, tokenizer: PreTrainedTokenizerBase, local_llama: PreTrainedModel
) -> None:
    result = api.completions.create(model="tiny-llama", prompt=PROMPTS, max_tokens=10, temperature=0, n=2, logprobs=3)
    assert len(result.choices) == 4 and [c.index for c in result.choices] == [0, 1, 2, 3]
    for number, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt).input_ids
        new = local_continuation(local_llama, ids, 10)
        expected = tokenizer.decode(new, skip_special_tokens=True)
        for choice in result.choices[2 * number : 2 * number + 2]:
            assert choice.text == expected
            assert "".join(choice.logprobs.tokens) == expected
            torch.testing.assert_close(
                choice.logprobs.token_logprobs,
                local_logprobs(local_llama, ids + new)[len(ids) - 1 :],
                atol=1e-4,
                rtol=0,
            )
            assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs)
            assert choice.logprobs.text_offset[0] == len(prompt)
    assert result.usage.prompt_tokens == sum(len(tokenizer(p).input_ids) for p in PROMPTS)


def test_streamed_completion_equals_the_whole_one_and_ends_with_usage(api: openai.OpenAI) -> None:
    kwargs = dict(model="tiny-llama", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    whole = api.completions.create(**kwargs)
    chunks = list(api.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_sequence_ends_the_text_before_it(api: openai.OpenAI) -> None:
    full = api.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    for stream in (False, True):
        result = api.completions.create(
            model="tiny-llama", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop], stream=stream
        )
        choices = [c.choices[0] for c in result] if stream else result.choices
        assert "".join(c.text for c in choices) == full[: full.index(stop)]
        assert choices[-1].finish_reason == "stop"


def test_echo_with_no_new_tokens_scores_the_prompt(
    api: openai.OpenAI, tokenizer: PreTrainedTokenizerBase, local_llama: PreTrainedModel
) -> None:
    result = api.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=1)
    choice = result.choices[0]
    assert choice.text == PROMPTS[1]
    assert choice.logprobs.token_logprobs[0] is None
    expected = local_logprobs(local_llama, tokenizer(PROMPTS[1]).input_ids)
    torch.testing.assert_close(choice.logprobs.token_logprobs[1:], expected, atol=1e-4, rtol=0)


def test_seeded_sampling_repeats_and_penalties_apply(api: openai.OpenAI) -> None:
    kwargs = dict(model="tiny-llama", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, top_p=0.9, n=2, seed=7)
    first, again = api.completions.create(**kwargs), api.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    penalized = api.completions.create(**kwargs, presence_penalty=2.0, frequency_penalty=2.0)
    assert len(penalized.choices) == 2 and all(c.finish_reason for c in penalized.choices)


def test_chat_greedy_equals_local_generate_on_the_rendered_conversation(
    api: openai.OpenAI, tokenizer: PreTrainedTokenizerBase, local_llama: PreTrainedModel
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]
    ids = chat_prompt_ids(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))
    expected = local_text(local_llama, tokenizer, ids, 8)
    whole = api.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    assert whole.choices[0].message.content == expected.split("\nUser:")[0]
    assert all(len(token.top_logprobs) == 2 for token in whole.choices[0].logprobs.content)
    stream = api.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_concurrent_requests_each_get_their_own_answer(
    api: openai.OpenAI, tokenizer: PreTrainedTokenizerBase, local_llama: PreTrainedModel
) -> None:
    prompts = [f"{word} was a" for word in ("Tom", "Lily", "Max", "Sue")]
    expected = [local_text(local_llama, tokenizer, tokenizer(p).input_ids, 8) for p in prompts]

    def ask(prompt: str) -> str:
        return api.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(ask, prompts)) == expected


def test_a_client_leaving_mid_stream_stops_its_generation(
    gateway: str, llama_swarm: LocalSwarm, tokenizer: PreTrainedTokenizerBase, local_llama: PreTrainedModel
) -> None:
    assert len(local_continuation(local_llama, tokenizer("Once").input_ids, 300)) == 300, "needs a long generation"
    node = next(p for p in llama_swarm.processes if p.name.startswith("node-0-3")).address
    steps_before = node_metric(node, 'swarm_node_steps_total{kind="step"}')
    host, port = gateway.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"prompt": "Once", "max_tokens": 300, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/completions", json.dumps(body), headers)
    response = connection.getresponse()
    assert response.status == 200 and response.fp.readline()
    connection.close()
    deadline = time.monotonic() + 30
    while node_metric(node, "swarm_node_sessions") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node_metric(node, "swarm_node_sessions") == 0
    assert node_metric(node, 'swarm_node_steps_total{kind="step"}') - steps_before < 150


def test_generate_endpoint_runs_batches_with_every_field(
    gateway: str, tokenizer: PreTrainedTokenizerBase, local_llama: PreTrainedModel
) -> None:
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    status, body = post(f"{gateway}/generate", {"prompt": PROMPTS, "max_length": 8, "return_prompt": True})
    assert status == 200, body
    greedy = [local_text(local_llama, tokenizer, i, 8) for i in ids]
    assert body["gen_text"] == [p + g for p, g in zip(PROMPTS, greedy, strict=True)]

    end = greedy[0][len(greedy[0]) // 2 :][:3]
    status, body = post(f"{gateway}/generate", {"prompt": PROMPTS[0], "max_length": 8, "end_sequence": end})
    assert body["gen_text"] == [greedy[0][: greedy[0].index(end)]]

    knobs = {"repetition_penalty": 1.5, "min_length": 8, "num_beams": 2, "early_stop": True, "bad_words": ["top"]}
    status, body = post(f"{gateway}/generate", {"prompt": PROMPTS[0], "max_length": 8, **knobs})
    bad = [tokenizer(w, add_special_tokens=False).input_ids for w in ("top", " top")]
    expected = local_text(
        local_llama,
        tokenizer,
        ids[0],
        8,
        repetition_penalty=1.5,
        min_new_tokens=8,
        num_beams=2,
        early_stopping=True,
        bad_words_ids=bad,
    )
    assert status == 200 and body["gen_text"] == [expected]

    sampled = {"prompt": PROMPTS, "max_length": 8, "do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9}
    first = post(f"{gateway}/generate", {**sampled, "seed": 3})[1]["gen_text"]
    assert post(f"{gateway}/generate", {**sampled, "seed": 3})[1]["gen_text"] == first


def test_invalid_requests_get_clear_errors_and_the_gateway_keeps_serving(gateway: str) -> None:
    completions = f"{gateway}/v1/completions"
    status, body = post(completions, {"prompt": "hi", "temperature": 5})
    assert status == 422 and "temperature" in body["error"]["message"]
    status, body = post(completions, {"prompt": "hi", "frobnicate": 1})
    assert status == 422 and "frobnicate" in body["error"]["message"]
    status, body = post(completions, {"prompt": "hi " * 600, "max_tokens": 4})
    assert status == 400 and "context" in body["error"]["message"]
    status, body = post(completions, {"prompt": "hi", "model": "gpt-4"})
    assert status == 404 and "tiny-llama" in body["error"]["message"]
    assert post(completions, {"prompt": "hi"}, key="wrong")[0] == 401
    assert post(completions, {"prompt": "hi"}, key=None)[0] == 401
    status, body = post(f"{gateway}/generate", {"prompt": "hi", "num_beams": 2, "do_sample": True})
    assert status == 400 and "beam" in body["error"]["message"]  # schema-valid, but the fields contradict
    status, body = post(completions, {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_missing_layers_are_a_503_that_names_them(tiny_llama: Path, llama_swarm: LocalSwarm) -> None:
    partial = start_gateway(llama_swarm, tiny_llama, "--model-name", "tiny-partial")
    try:
        api = openai.OpenAI(base_url=f"{partial.address}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as failure:
                api.completions.create(model="tiny-partial", prompt="hi", max_tokens=2, stream=stream)
            assert failure.value.status_code == 503 and "4-7" in failure.value.message
        status, body = post(f"{partial.address}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 503 and "swarm-node" in body["error"]["message"]
    finally:
        partial.kill()
