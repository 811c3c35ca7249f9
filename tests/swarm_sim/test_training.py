"""Learning through the swarm: gradients through 2 and 3 nodes equal local autograd, a 50-step run reproduces the
local loss curve (also with a node killed mid-run), and what was learned is served: generate, score, batched
sessions with and without an adapter on one node, peers that refuse training left out."""

from __future__ import annotations

import copy
import json
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from swarm.client import DistributedModelForCausalLM
from swarm.client.core.scheduler import DecodeScheduler
from swarm.client.core.tuner import Example, TuneConfig, Tuner
from swarm.client.core.tuning import LowRankAdapter, SoftPrompt, Tuning
from swarm.client.local_swarm import LocalSwarm, Process
from tests.swarm_sim.test_cli import swarm_client
from tests.swarm_sim.test_gateway import API_KEY, local_text, start_gateway
from tests.tuning_reference import HFSoftPromptModel, LocalTunedModel, merge_adapter

pytestmark = pytest.mark.oracle  # also run against the lowest transformers allowed (.ci/run)

IDS = torch.tensor([[1, 45, 67, 89, 120, 33, 250, 7], [1, 300, 12, 99, 4, 0, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
LABELS = torch.where(MASK.bool(), IDS, torch.full_like(IDS, -100))
PROMPT_TOKENS = 4
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def swarm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """tiny-llama over 2 nodes (`tiny-llama`) and over 3 (`tiny-three`); `tiny-spare` has a second 4-7 node to
    kill, and a 0-3 node that refuses training next to one that trains."""
    with LocalSwarm(tmp_path_factory.mktemp("training")) as local:
        local.start_registry()
        local.two_nodes = [local.start_node(tiny_llama, "0-3"), local.start_node(tiny_llama, "4-7")]  # type: ignore[attr-defined]
        for layers in ("0-2", "3-5", "6-7"):
            local.start_node(tiny_llama, layers, "--model-name", "tiny-three")
        local.spare_nodes = {  # type: ignore[attr-defined]
            "refuses": local.start_node(tiny_llama, "0-3", "--model-name", "tiny-spare", "--no-training"),
            "trains": local.start_node(tiny_llama, "0-3", "--model-name", "tiny-spare"),
            "second-a": local.start_node(tiny_llama, "4-7", "--model-name", "tiny-spare"),
            "second-b": local.start_node(tiny_llama, "4-7", "--model-name", "tiny-spare"),
        }
        for name in ("tiny-llama", "tiny-three", "tiny-spare"):
            local.wait_ready(name)
        for node in local.spare_nodes.values():  # type: ignore[attr-defined]
            local.wait_online(node)
        yield local


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-three"])
def remote(
    request: pytest.FixtureRequest, tiny_llama: Path, swarm: LocalSwarm
) -> Iterator[DistributedModelForCausalLM]:
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, registry=swarm.registry_url, model_name=request.param
    )
    yield model
    model.close()


@pytest.fixture(scope="module")
def own_runtime(tiny_llama: Path) -> LocalTunedModel:
    return LocalTunedModel(tiny_llama)


def soft_prompt(hidden: int, seed: int = 0) -> Tuning:
    generator = torch.Generator().manual_seed(seed)
    return Tuning("tiny-llama", SoftPrompt(torch.randn(PROMPT_TOKENS, hidden, generator=generator) * 0.5))


def adapter(model: DistributedModelForCausalLM, seed: int = 0, layers: list[int] | None = None) -> Tuning:
    """An adapter on every layer with B not zero (a freshly made one changes nothing, so has nothing to check)."""
    generator = torch.Generator().manual_seed(seed)
    lora = LowRankAdapter(model.architecture.spec, 4, alpha=8, layers=layers, generator=generator)
    with torch.no_grad():
        for name, parameter in lora.pairs.items():
            if name.endswith("_b"):
                parameter.normal_(0, 0.2, generator=generator)
    return Tuning("tiny-llama", adapter=lora)


def copy_of(tuning: Tuning) -> Tuning:
    """The same values in parameters of their own (so each side's gradients are its own)."""
    return copy.deepcopy(tuning)


def gradients(model, tuning: Tuning) -> tuple[float, dict[str, torch.Tensor]]:
    tuning.zero_grad()
    output = model(input_ids=IDS, attention_mask=MASK, labels=LABELS, tuning=tuning)
    output.loss.backward()
    return float(output.loss.detach()), {name: p.grad.clone() for name, p in tuning.named_parameters()}


def assert_same_gradients(swarm_side: tuple, local_side: tuple) -> None:
    assert abs(swarm_side[0] - local_side[0]) < TOLERANCE
    assert swarm_side[1].keys() == local_side[1].keys()
    for name, grad in swarm_side[1].items():
        difference = (grad - local_side[1][name]).abs().max().item()
        assert difference < TOLERANCE, f"{name}: gradients differ by {difference:.3g}"
        assert local_side[1][name].abs().max() > 1e-4, f"{name}: a zero gradient checks nothing"


def test_soft_prompt_gradients_equal_local_transformers_autograd(
    remote: DistributedModelForCausalLM, local_llama: PreTrainedModel
) -> None:
    tuning = soft_prompt(remote.config.hidden_size)
    assert_same_gradients(gradients(remote, tuning), gradients(HFSoftPromptModel(local_llama), copy_of(tuning)))


def test_adapter_gradients_equal_local_autograd(
    remote: DistributedModelForCausalLM, own_runtime: LocalTunedModel
) -> None:
    tuning = adapter(remote)
    assert_same_gradients(gradients(remote, tuning), gradients(own_runtime, copy_of(tuning)))


def test_soft_prompt_and_adapter_together(remote: DistributedModelForCausalLM, own_runtime: LocalTunedModel) -> None:
    both = adapter(remote, seed=2, layers=[1, 5, 6])
    both.soft_prompt = soft_prompt(remote.config.hidden_size, seed=3).soft_prompt
    assert_same_gradients(gradients(remote, both), gradients(own_runtime, copy_of(both)))


def test_an_adapter_means_what_lora_means_in_transformers(
    remote: DistributedModelForCausalLM, tiny_llama: Path
) -> None:
    """Generation with an adapter (sessions opened with it on every peer) equals transformers with the adapter's
    products merged into its weights."""
    tuning = adapter(remote, seed=5)
    merged = merge_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), tuning)
    with torch.no_grad():
        expected = merged.generate(IDS[:1], max_new_tokens=10, do_sample=False)
        plain = remote.generate(IDS[:1], max_new_tokens=10, do_sample=False)
        got = remote.generate(IDS[:1], max_new_tokens=10, do_sample=False, tuning=tuning)
    assert got.tolist() == expected.tolist()
    assert got.tolist() != plain.tolist(), "the adapter must change the output for this test to mean anything"


def test_generate_and_score_with_a_soft_prompt_equal_local(
    remote: DistributedModelForCausalLM, local_llama: PreTrainedModel
) -> None:
    """Greedy generation (left-padded batch, the prompt in front of the padding) and scores with a soft prompt equal
    transformers given the prompt as embeddings."""
    tuning = soft_prompt(remote.config.hidden_size, seed=7)
    prompt = tuning.soft_prompt.embeddings.detach()
    ids = torch.tensor([[0, 0, 1, 45, 67, 89], [1, 300, 12, 99, 4, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        got = remote.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, tuning=tuning)
        embeds = torch.cat([prompt[None].expand(2, -1, -1), local_llama.get_input_embeddings()(ids)], dim=1)
        # transformers puts the soft prompt after the left padding when given a mask; swarm puts it in front of
        # it. Both attend to the same tokens at the same positions, so each row's result is the same.
        rows = []
        for row in range(2):
            real = mask[row].bool()
            row_embeds = torch.cat([prompt, local_llama.get_input_embeddings()(ids[row][real])])[None]
            rows.append(local_llama.generate(inputs_embeds=row_embeds, max_new_tokens=8, do_sample=False)[0].tolist())
        scored = remote(input_ids=ids, attention_mask=mask, tuning=tuning).logits
        local_scores = HFSoftPromptModel(local_llama)(input_ids=ids[1:], tuning=tuning).logits
    assert [got[row, ids.shape[1] :].tolist() for row in range(2)] == rows
    assert embeds.shape[1] == PROMPT_TOKENS + ids.shape[1]
    torch.testing.assert_close(scored[1], local_scores[0], atol=1e-4, rtol=0)


def node_counter(node: Process, metric: str) -> float:
    """A node's Prometheus counter, summed over the series that start like `metric` (name and first labels)."""
    text = urllib.request.urlopen(node.address.replace("ws://", "http://") + "/metrics", timeout=10).read().decode()
    name, _, labels = metric.partition("{")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or "{" + labels in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def backwards(node: Process) -> float:
    return node_counter(node, 'swarm_node_steps_total{kind="backward"')


def test_adapted_and_plain_sessions_batch_on_one_node_and_each_equal_local(
    tiny_llama: Path, swarm: LocalSwarm, local_llama: PreTrainedModel
) -> None:
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=swarm.registry_url)
    scheduler = DecodeScheduler(model, lanes=1)
    tuning = adapter(model, seed=9)
    merged = merge_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), tuning)
    nodes: list[Process] = swarm.two_nodes  # type: ignore[attr-defined]
    before = sum(node_counter(node, "swarm_node_batched_steps_total") for node in nodes)
    results: dict[str, torch.Tensor] = {}
    try:
        threads = [
            threading.Thread(
                target=lambda key=key, extra=extra: results.__setitem__(
                    key, scheduler.generate(IDS[:1], max_new_tokens=24, pad_token_id=0, **extra)
                )
            )
            for key, extra in (("plain", {}), ("adapted", {"tuning": tuning}))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        scheduler.close()
        model.close()
    with torch.no_grad():
        assert results["plain"].tolist() == local_llama.generate(IDS[:1], max_new_tokens=24, do_sample=False).tolist()
        assert results["adapted"].tolist() == merged.generate(IDS[:1], max_new_tokens=24, do_sample=False).tolist()
    assert sum(node_counter(node, "swarm_node_batched_steps_total") for node in nodes) > before


def fifty_steps(model, hidden: int, on_step=None) -> list[float]:
    examples = [
        Example([1, 45, 67, 89, 120, 33], [-100, -100, -100, 89, 120, 33]),
        Example([1, 300, 12, 99], [-100, -100, 12, 99]),
        Example([1, 7, 7, 250, 14, 3, 2], [-100, -100, -100, -100, 14, 3, 2]),
    ]
    tuning = soft_prompt(hidden, seed=11)
    tuner = Tuner(model, tuning, examples, TuneConfig(steps=50, batch_size=2, learning_rate=0.05, seed=4), pad_id=0)
    return tuner.run(on_step)


@pytest.fixture(scope="module")
def local_curve(local_llama: PreTrainedModel) -> list[float]:
    return fifty_steps(HFSoftPromptModel(local_llama), local_llama.config.hidden_size)


def test_a_fifty_step_run_reproduces_the_local_loss_curve(
    tiny_llama: Path, swarm: LocalSwarm, local_curve: list[float]
) -> None:
    model = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=swarm.registry_url)
    try:
        curve = fifty_steps(model, model.config.hidden_size)
    finally:
        model.close()
    assert max(abs(a - b) for a, b in zip(curve, local_curve, strict=True)) < 1e-4
    assert sum(curve[-5:]) < sum(curve[:5]) - 0.5, "the loss must fall for the run to mean anything"


def test_a_node_killed_mid_run_changes_no_loss_and_refusers_are_left_out(
    tiny_llama: Path, swarm: LocalSwarm, local_curve: list[float]
) -> None:
    spares: dict[str, Process] = swarm.spare_nodes  # type: ignore[attr-defined]
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_llama, registry=swarm.registry_url, model_name="tiny-spare"
    )
    killed: list[Process] = []

    def kill_the_one_in_use(step: int, loss: float) -> None:
        if step == 25:
            [busy] = [spares[name] for name in ("second-a", "second-b") if backwards(spares[name]) > 0]
            busy.kill()
            killed.append(busy)

    try:
        curve = fifty_steps(model, model.config.hidden_size, kill_the_one_in_use)
    finally:
        model.close()
    assert killed and not killed[0].alive()
    assert max(abs(a - b) for a, b in zip(curve, local_curve, strict=True)) < 1e-4
    assert backwards(spares["refuses"]) == 0
    assert backwards(spares["trains"]) == 50


# --- the command line and the gateway ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tune") / "data.jsonl"
    pairs = [("Q: Where is the cave?\nA:", " far away"), ("Q: Who is Leo?\nA:", " a boy"), ("Q: Hi\nA:", " hello")]
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    return path


def tune(tiny_llama: Path, swarm: LocalSwarm, data: Path, out: Path, steps: int) -> subprocess.CompletedProcess[str]:
    args = ["tune", str(data), "--out", str(out), "--prompt-tokens", "4", "--steps", str(steps), "--save-every", "3"]
    args += [
        "--batch-size",
        "2",
        "--learning-rate",
        "0.05",
        "--model",
        str(tiny_llama),
        "--registry",
        swarm.registry_url,
    ]
    result = swarm_client(*args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tuned_file(tiny_llama: Path, swarm: LocalSwarm, data_file: Path) -> Path:
    out = data_file.parent / "straight.safetensors"
    result = tune(tiny_llama, swarm, data_file, out, 6)
    assert "training a soft prompt of 4 tokens on 3 examples through the swarm" in result.stderr
    assert "loss " in result.stderr and f"saved {out}" in result.stderr
    return out


def test_tune_stopped_and_run_again_resumes_exactly(
    tiny_llama: Path, swarm: LocalSwarm, data_file: Path, tuned_file: Path
) -> None:
    out = data_file.parent / "resumed.safetensors"
    tune(tiny_llama, swarm, data_file, out, 3)
    halfway = load_file(str(out))["soft_prompt"]
    again = tune(tiny_llama, swarm, data_file, out, 6)
    assert f"resuming {out} at step 3 of 6" in again.stderr
    resumed, straight = load_file(str(out)), load_file(str(tuned_file))
    assert resumed.keys() == straight.keys() == {"soft_prompt"}
    torch.testing.assert_close(resumed["soft_prompt"], straight["soft_prompt"], atol=1e-6, rtol=0)
    assert (resumed["soft_prompt"] - halfway).abs().max() > 1e-3, "the resumed steps must have trained"


def local_soft_prompt_text(model: PreTrainedModel, tokenizer, tuned: Path, prompt: str, new: int) -> str:
    embeddings = load_file(str(tuned))["soft_prompt"]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    embeds = torch.cat([embeddings, model.get_input_embeddings()(ids)[0]])[None]
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, max_new_tokens=new, do_sample=False, pad_token_id=0)[0].tolist()
    return tokenizer.decode(out[: out.index(2)] if 2 in out else out, skip_special_tokens=True)


def test_generate_and_score_with_a_tuned_soft_prompt_equal_local(
    tiny_llama: Path, swarm: LocalSwarm, tuned_file: Path, local_llama: PreTrainedModel
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = "Q: Where is the cave?\nA:"
    common = ["--model", str(tiny_llama), "--registry", swarm.registry_url, "--soft-prompt", str(tuned_file)]
    result = swarm_client("generate", prompt, "--greedy", "--max-new-tokens", "8", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == local_soft_prompt_text(local_llama, tokenizer, tuned_file, prompt, 8).strip()

    texts = tuned_file.parent / "texts.txt"
    texts.write_text("The cat sat on the mat\n")
    scored = swarm_client("score", str(texts), *common)
    assert scored.returncode == 0, scored.stderr[-3000:]
    ids = tokenizer("The cat sat on the mat", return_tensors="pt").input_ids
    tuning = Tuning("tiny-llama", SoftPrompt(load_file(str(tuned_file))["soft_prompt"]))
    with torch.no_grad():
        logits = HFSoftPromptModel(local_llama)(input_ids=ids, tuning=tuning).logits[0]
    expected = torch.log_softmax(logits.float(), -1)[:-1].gather(1, ids[0, 1:, None]).sum().item()
    assert abs(json.loads(scored.stdout)["logprob"] - expected) < 1e-3

    wrong = swarm_client("generate", prompt, *common[:-2], "--adapter", str(tuned_file))
    assert wrong.returncode == 2 and "holds no adapter" in wrong.stderr


def test_the_gateway_serves_tunings_as_models_of_their_own(
    tiny_llama: Path, swarm: LocalSwarm, tuned_file: Path, local_llama: PreTrainedModel
) -> None:
    """A soft prompt from `tune` and an adapter saved from Python, each served under its own name next to the base
    model, each answering what local transformers answers with it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    client = DistributedModelForCausalLM.from_pretrained(tiny_llama, registry=swarm.registry_url)
    lora = adapter(client, seed=13)
    client.close()
    lora_file = tuned_file.parent / "lora.safetensors"
    lora.save(lora_file)
    merged = merge_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), lora)
    gateway = start_gateway(swarm, tiny_llama, "--tuned", f"quiz={tuned_file}", "--tuned", f"lora={lora_file}")
    try:
        api = openai.OpenAI(base_url=f"{gateway.address}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        assert [model.id for model in api.models.list()] == ["tiny-llama", "tiny-llama:quiz", "tiny-llama:lora"]
        prompt = "Q: Who is Leo?\nA:"
        ids = tokenizer(prompt).input_ids
        expected = {
            "tiny-llama:quiz": local_soft_prompt_text(local_llama, tokenizer, tuned_file, prompt, 8),
            "tiny-llama:lora": local_text(merged, tokenizer, ids, 8),
            "tiny-llama": local_text(local_llama, tokenizer, ids, 8),
        }
        assert len(set(expected.values())) == 3, "each tuning must change the text for this test to mean anything"
        for model, text in expected.items():
            reply = api.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            assert reply.model == model and reply.choices[0].text == text
        with pytest.raises(openai.NotFoundError, match="tiny-llama:quiz"):
            api.completions.create(model="tiny-llama:other", prompt=prompt, max_tokens=2)
    finally:
        gateway.kill()
