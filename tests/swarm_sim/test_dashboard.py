"""The dashboard in a real headless browser, and the Prometheus endpoints, against a live swarm."""

from __future__ import annotations

import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from swarm.client import DistributedModelForCausalLM
from swarm.client.local_swarm import LocalSwarm
from swarm.identity import CheckpointDigests

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def fetch(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_dashboard_shows_coverage_and_a_gap_appears_live_when_a_node_dies(tiny_llama: Path, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_registry()
        swarm.start_node(tiny_llama, "0-3")
        second_half = swarm.start_node(tiny_llama, "4-7")
        swarm.wait_ready("tiny-llama")
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(f"http://127.0.0.1:{swarm.registry_port}/")
            model = page.locator('.model[data-model="tiny-llama"]')
            model.locator(".badge.ok").wait_for(timeout=15_000)
            assert model.locator(".cell").evaluate_all("cells => cells.map(c => c.dataset.count)") == ["1"] * 8
            assert page.locator("#peers tbody tr").count() == 2
            digest = CheckpointDigests(tiny_llama)  # each row says what the span is: model_id / weights
            peers_text = page.locator("#peers").inner_text()
            assert f"{digest.model_id[:8]} / {digest.span(0, 4)[:8]}" in peers_text
            assert f"{digest.model_id[:8]} / {digest.span(4, 8)[:8]}" in peers_text
            # the first half's row shows the round trip it measured to the second half, a peer that may follow it
            next_hop = re.compile(re.escape(second_half.address) + r" \d+\.\d ms")
            page.locator("#peers td", has_text=next_hop).wait_for(timeout=20_000)
            page.screenshot(path=str(tmp_path / "dashboard-covered.png"))

            second_half.kill()
            model.locator(".badge.bad").wait_for(timeout=15_000)  # no reload: the page polls the registry
            counts = model.locator(".cell").evaluate_all("cells => cells.map(c => c.dataset.count)")
            assert counts == ["1"] * 4 + ["0"] * 4
            assert "4-7" in model.inner_text()
            assert "gone" in page.locator("#peers").inner_text()
            page.locator('#peers th[data-key="start"]').click()
            page.screenshot(path=str(tmp_path / "dashboard-gap.png"))
            browser.close()
    for shot in ("dashboard-covered.png", "dashboard-gap.png"):
        assert (tmp_path / shot).stat().st_size > 5_000


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_private_swarms_dashboard_opens_with_the_token_in_its_address(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    token = "dashboard token"
    with LocalSwarm(tmp_path, token=token) as swarm:
        swarm.start_registry("--token", token)
        base = f"http://127.0.0.1:{swarm.registry_port}/"
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            page = browser.new_page()
            assert page.goto(base).status == 401
            assert page.goto(base + "?token=" + urllib.parse.quote(token)).status == 200
            page.locator("#status", has_text="updated").wait_for(timeout=15_000)  # its own fetches send the token
            assert "No model is served" in page.locator("#models").inner_text()
            browser.close()
        assert token not in swarm.processes[0].log()


def test_metrics_describe_the_registry_and_each_node(
    llama_swarm: LocalSwarm, swarm_llama: DistributedModelForCausalLM
) -> None:
    swarm_llama.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=3, do_sample=False)
    registry = fetch(f"http://127.0.0.1:{llama_swarm.registry_port}/metrics")
    assert 'swarm_registry_peers{state="online"} 5.0' in registry
    assert 'swarm_model_usable{model="tiny-llama"} 1.0' in registry
    assert 'swarm_model_usable{model="tiny-partial"} 0.0' in registry
    assert 'swarm_model_layers_covered{model="tiny-partial"} 4.0' in registry

    nodes = [p for p in llama_swarm.processes if "swarm.node.main" in p.args]
    texts = [fetch(node.address.replace("ws://", "http://") + "/metrics") for node in nodes]
    assert all("swarm_node_cache_tokens_free" in text and "swarm_node_step_seconds_bucket" in text for text in texts)
    steps = [
        line for text in texts for line in text.splitlines() if line.startswith('swarm_node_steps_total{kind="step"}')
    ]
    assert any(float(line.split()[-1]) >= 3 for line in steps)
