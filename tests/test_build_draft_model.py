"""`scripts/build_draft_model.py` distills a draft for any checkpoint from a text file, and the client takes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from swarm.client.core.drafts import load_draft_model
from swarm.client.local_swarm import child_env

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_draft_model.py"
TEXT = "Once upon a time, there was a little cat named Tom. Tom liked to play in the sun with his red ball."


def build(target: Path, corpus: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), "--target", str(target), "--corpus", str(corpus), "--out", str(out)]
    return subprocess.run([*command, *flags], capture_output=True, text=True, timeout=300, env=child_env())


def test_a_draft_distilled_from_a_corpus_file_loads_as_the_targets_draft(tiny_llama: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n\n".join(f"{TEXT} It was day {day}." for day in range(40)), encoding="utf-8")
    out = tmp_path / "tiny-llama-draft"
    small = ["--steps", "6", "--warmup", "2", "--hidden", "32", "--layers", "1", "--intermediate", "64"]
    result = build(tiny_llama, corpus, out, *small, "--seq-len", "32", "--batch", "2", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert '"agreement"' in result.stdout
    draft = load_draft_model(out, AutoTokenizer.from_pretrained(tiny_llama), 4)
    assert draft.config.num_hidden_layers == 1 and draft.config.vocab_size == len(AutoTokenizer.from_pretrained(out))
    card = (out / "README.md").read_text()
    assert f"--corpus {corpus}" in card and "--steps 6" in card and "tiny-llama" in card


def test_a_corpus_too_short_for_one_block_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "short.txt"
    corpus.write_text("Too short.", encoding="utf-8")
    result = build(tiny_llama, corpus, tmp_path / "draft")
    assert result.returncode == 2 and "give more text" in result.stderr
