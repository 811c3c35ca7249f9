"""`swarm-client chat`, `score` and `batch` run as a user would, against a real swarm, checked against the
local model on the same checkpoint."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pexpect
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from swarm.client.local_swarm import LocalSwarm, child_env
from swarm.client.serve.chat_template import chat_prompt_ids, render_chat


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_llama)


def cli(swarm: LocalSwarm, checkpoint: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "swarm.client.cli.main",
        *args,
        "--model",
        str(checkpoint),
        "--registry",
        swarm.registry_url,
    ]


def local_logprobs(model: PreTrainedModel, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def local_greedy(model: PreTrainedModel, ids: list[int], max_new: int) -> list[int]:
    """Greedy tokens after `ids` from the local model, up to (without) the end of sequence."""
    output = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    new = output[0, len(ids) :].tolist()
    return new[: new.index(2)] if 2 in new else new


def open_sessions(node_address: str) -> float:
    text = urllib.request.urlopen(node_address.replace("ws://", "http://") + "/metrics", timeout=10).read().decode()
    return float(re.search(r"^swarm_node_sessions (\S+)$", text, re.MULTILINE).group(1))


def test_chat_keeps_the_conversation_in_one_session(
    tiny_llama: Path, llama_swarm: LocalSwarm, local_llama: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    first_ids = chat_prompt_ids(tokenizer, render_chat(tokenizer, [{"role": "user", "content": "Hello"}], True))
    first_new = local_greedy(local_llama, first_ids, 8)
    first_reply = tokenizer.decode(first_new)
    assert len(first_new) == 8 and "\nUser:" not in first_reply, "the scenario needs a first reply of 8 whole tokens"
    next_turn = tokenizer("\nUser: And then?\nAssistant:", add_special_tokens=False).input_ids
    second_reply = tokenizer.decode(local_greedy(local_llama, first_ids + first_new + next_turn, 8)).split("\nUser:")[0]
    nodes = [p for p in llama_swarm.processes if p.name.startswith("node-") and "--model-name" not in p.args]

    command = cli(llama_swarm, tiny_llama, "chat", "--temperature", "0", "--max-new-tokens", "8")
    chat = pexpect.spawn(command[0], command[1:], env=child_env(), encoding="utf-8", timeout=120)
    try:
        chat.expect_exact("you> ")
        chat.sendline("Hello")
        chat.expect_exact("you> ")
        assert chat.before.replace("\r\n", "\n") == f"Hello\n{first_reply}\n"
        assert [open_sessions(node.address) for node in nodes] == [1, 1]
        chat.sendline("And then?")
        chat.expect_exact("you> ")
        assert chat.before.replace("\r\n", "\n") == f"And then?\n{second_reply}\n"
        assert [open_sessions(node.address) for node in nodes] == [1, 1], "the second turn reused the session"
        chat.sendline("/quit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)


def test_score_equals_local_log_likelihoods(
    tiny_llama: Path,
    llama_swarm: LocalSwarm,
    local_llama: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tmp_path: Path,
) -> None:
    texts = ["Once upon a time there was a cat", "The dog", "A small bird sang all day long"]
    source = tmp_path / "texts.txt"
    source.write_text(f"{texts[0]}\n{texts[1]}\n\n{json.dumps({'text': texts[2]})}\n")
    result = subprocess.run(
        cli(llama_swarm, tiny_llama, "score", str(source), "--batch-size", "2"),
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["text"] for record in records] == texts
    for text, record in zip(texts, records, strict=True):
        expected = local_logprobs(local_llama, tokenizer(text).input_ids)
        assert record["token_logprobs"][0] is None and "".join(record["tokens"]) == text
        torch.testing.assert_close(record["token_logprobs"][1:], expected, atol=1e-4, rtol=0)
        assert record["logprob"] == pytest.approx(sum(expected), abs=1e-3)


def test_score_choices_picks_the_likeliest_continuation(
    tiny_llama: Path,
    llama_swarm: LocalSwarm,
    local_llama: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tmp_path: Path,
) -> None:
    lines, choices = ["Is the sky blue?", "Do cats fly?"], ["yes", "no", "maybe"]
    source = tmp_path / "questions.txt"
    source.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        cli(llama_swarm, tiny_llama, "score", str(source), "--choices", ",".join(choices)),
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert result.returncode == 0, result.stderr
    for line, record in zip(lines, map(json.loads, result.stdout.splitlines()), strict=True):
        head = tokenizer(line).input_ids
        expected = {}
        for choice in choices:
            whole = tokenizer(f"{line} {choice}").input_ids
            expected[choice] = sum(local_logprobs(local_llama, whole)[len(head) - 1 :])
        assert record["choices"] == pytest.approx(expected, abs=1e-3)
        assert record["best"] == max(expected, key=expected.__getitem__)


def batch_requests() -> list[str]:
    """Mixed settings, one line unparseable and one out of range."""
    lines = [
        json.dumps({"prompt": f"Story {i}: once upon a time", "max_tokens": 12, "temperature": 0}) for i in range(8)
    ]
    lines[1] = json.dumps({"prompt": "The cat", "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True})
    lines[2] = json.dumps({"prompt": "The dog", "max_tokens": 6, "temperature": 0.9, "n": 2, "best_of": 3, "seed": 1})
    lines[3] = json.dumps({"prompt": ["A", "B"], "max_tokens": 6, "stop": ["e"], "top_p": 0.5, "seed": 2})
    return [*lines[:5], "{not json", *lines[5:], json.dumps({"prompt": "x", "temperature": 9})]


def test_batch_resumes_after_a_kill_and_records_bad_lines(
    tiny_llama: Path,
    llama_swarm: LocalSwarm,
    local_llama: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tmp_path: Path,
) -> None:
    requests = batch_requests()
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(requests) + "\n")
    command = cli(llama_swarm, tiny_llama, "batch", str(source), str(output), "--concurrency", "1")

    first = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if output.exists() and output.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    assert first.poll() is None, "the first run should still be working when it is killed"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    before_kill = [line for line in output.read_text().split("\n") if line.endswith("}")]
    assert 3 <= len(before_kill) < len(requests)

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=180, env=child_env())
    assert rerun.returncode == 1 and "2 line(s) failed" in rerun.stderr, rerun.stderr
    final = output.read_text().splitlines()
    assert all(line in final for line in before_kill), "finished lines are kept, not run again"
    records = {record["line"]: record for record in map(json.loads, final)}
    assert len(final) == len(records) == len(requests)

    assert "error" in records[6] and "error" in records[len(requests)]
    assert "temperature" in records[len(requests)]["error"]["message"]
    greedy = records[1]["result"]
    expected = local_greedy(local_llama, tokenizer("Story 0: once upon a time").input_ids, 12)
    assert greedy["choices"][0]["text"] == tokenizer.decode(expected)
    assert set(greedy["request_time"]) == {"start", "end", "seconds"}
    echo = records[2]["result"]["choices"][0]
    assert echo["text"].startswith("The cat") and set(echo["logprobs"]) == {
        "tokens",
        "token_logprobs",
        "top_logprobs",
        "text_offset",
    }
    assert len(records[3]["result"]["choices"]) == 2 and len(records[4]["result"]["choices"]) == 2
