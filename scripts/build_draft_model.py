"""Build the small draft model that speculative decoding uses with swarm's default checkpoint.

Speculative decoding gains only where the client's drafts are right. Prompt lookup drafts from the text so far,
and the embedded story model copies its context too rarely for that to pay (1.0-1.2 tokens a step). A draft
model of its own, trained to agree with the default model, drafts the next words of any story.

The draft is distilled, not trained on the corpus alone: on the default model's own corpus (the same grammar,
seed and tokenizer, so the vocabularies are identical) it learns to match the default model's next-token
distribution (KL divergence at temperature 1), which is what makes its greedy picks the target's. Agreement is
measured on held-out stories as the share of positions where both models' top token is the same.

Any other checkpoint gets a draft the same way from text like what it will be asked to continue (`--corpus`):
the draft is a small Llama with the target's tokenizer files, whatever the target's own architecture.

    python scripts/build_draft_model.py --out swarm/default_model/tiny-stories-draft --minutes 8
    python scripts/build_draft_model.py --target ./models/my-model --corpus my-texts.txt --out ./models/my-model-draft
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM


def load_builder() -> object:
    """The default model's build script: its corpus grammar, packing and learning-rate schedule."""
    path = Path(__file__).with_name("build_default_model.py")
    spec = importlib.util.spec_from_file_location("build_default_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""Whichever of these the target has are copied: the draft must tokenize exactly as the target does."""


def read_corpus(path: Path) -> list[str]:
    """Documents of a text file, separated by blank lines."""
    text = path.read_text(encoding="utf-8")
    return [document.strip() for document in text.split("\n\n") if document.strip()]


def make_draft(target: LlamaForCausalLM, hidden: int, layers: int, intermediate: int) -> LlamaForCausalLM:
    """A shallow, narrow Llama with the target's vocabulary, special tokens and context length."""
    config = LlamaConfig(
        vocab_size=target.config.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=target.config.max_position_embeddings,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=target.config.bos_token_id,
        eos_token_id=target.config.eos_token_id,
        pad_token_id=target.config.pad_token_id,
    )
    return LlamaForCausalLM(config).float()


def distill_step(
    draft: LlamaForCausalLM, target: LlamaForCausalLM, opt: torch.optim.Optimizer, batch: torch.Tensor, lr: float
) -> float:
    """One AdamW update towards the target's next-token distribution; returns the KL divergence."""
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.no_grad():
        teacher = F.log_softmax(target(input_ids=batch).logits, dim=-1)
    student = F.log_softmax(draft(input_ids=batch).logits, dim=-1)
    loss = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def agreement(draft: LlamaForCausalLM, target: LlamaForCausalLM, blocks: torch.Tensor, batch: int) -> float:
    """Share of held-out positions where the draft's most likely next token is the target's."""
    draft.eval()
    same = total = 0
    for i in range(0, len(blocks), batch):
        chunk = blocks[i : i + batch]
        picks = draft(input_ids=chunk).logits.argmax(-1), target(input_ids=chunk).logits.argmax(-1)
        same += int((picks[0] == picks[1]).sum())
        total += picks[0].numel()
    draft.train()
    return same / total


README = """# {name}

The draft model for speculative decoding with `{target}`: the client drafts
several tokens with it, the swarm checks them in one step. Output is unchanged
(greedy: identical tokens; sampling: the target's distribution); only the
number of steps through the swarm falls.

- Architecture: `LlamaForCausalLM`, {params:,} parameters, float32, hidden size
  {hidden}, {layers} layers, intermediate size {intermediate}, tied embeddings;
  its tokenizer files are copied from `{target}`.
- Training: distilled from `{target}` (KL divergence to its next-token
  distribution) on {corpus}: {steps} AdamW steps of
  {batch} x {seq_len} tokens ({minutes:.1f} min on this machine's CPU).
- Agreement with `{target}` on held-out text: its top token is the
  target's at **{agree:.1%}** of positions.

Rebuild it:

    {command}

Use it:

    {usage}
"""


def main() -> None:
    """Target -> corpus -> distilled draft -> saved folder with the target's tokenizer files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=Path("swarm/default_model/tiny-stories"))
    parser.add_argument("--out", type=Path, default=Path("swarm/default_model/tiny-stories-draft"))
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget")
    parser.add_argument("--steps", type=int, default=0, help="exact step count (0: fit --minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument(
        "--corpus",
        type=Path,
        help="text to distill on, documents separated by blank lines (default: the demo model's own synthetic "
        "stories; needed for any other target)",
    )
    parser.add_argument("--corpus-mb", type=float, default=6.0, help="size of the synthetic stories")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    builder = load_builder()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target).eval()
    stories = read_corpus(args.corpus) if args.corpus else builder.make_corpus(int(args.corpus_mb * 1e6), args.seed)
    seq_len = min(args.seq_len, target.config.max_position_embeddings)
    blocks = builder.pack_tokens(tokenizer, stories, seq_len)
    if len(blocks) < 3:
        parser.error(
            f"the corpus makes {len(blocks)} blocks of {args.seq_len} tokens; give more text or a shorter --seq-len"
        )
    n_val = max(1, len(blocks) // 100)
    val, data = blocks[:n_val], blocks[n_val + 1 :]
    draft = make_draft(target, args.hidden, args.layers, args.intermediate)
    params = sum(p.numel() for p in draft.parameters())
    print(f"{params:,} parameters; {len(data):,} training blocks", flush=True)
    opt = builder.make_optimizer(draft, args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.monotonic()
    total, step, window = args.steps or 10**9, 0, []
    order, position = torch.randperm(len(data), generator=generator), 0
    draft.train()
    while step < total:
        if position + args.batch > len(order):
            order, position = torch.randperm(len(data), generator=generator), 0
        batch, position = data[order[position : position + args.batch]], position + args.batch
        window.append(distill_step(draft, target, opt, batch, builder.lr_at(step, total, args.lr, args.warmup)))
        step += 1
        if step == 30 and not args.steps:  # the measured speed sets the schedule's length
            total = int(args.minutes * 60 / ((time.monotonic() - start) / step))
            print(f"planned {total} steps", flush=True)
        if step % 100 == 0 or step == total:
            print(f"step {step}/{total} kl {sum(window) / len(window):.4f}", flush=True)
            window = []
    minutes = (time.monotonic() - start) / 60
    agree = agreement(draft, target, val, args.batch)
    print(json.dumps({"steps": step, "agreement": round(agree, 4), "minutes": round(minutes, 1)}), flush=True)
    draft.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    draft.save_pretrained(args.out, safe_serialization=True)
    for name in TOKENIZER_FILES:  # the target's own files, byte for byte
        if (args.target / name).is_file():
            shutil.copyfile(args.target / name, args.out / name)
    corpus = f"--corpus {args.corpus} " if args.corpus else ""
    command = (
        f"python scripts/build_draft_model.py --target {args.target} --out {args.out} {corpus}--steps {step} "
        f"--seed {args.seed} --hidden {args.hidden} --layers {args.layers} --intermediate {args.intermediate} "
        f"--threads {args.threads}"
    )
    (args.out / "README.md").write_text(
        README.format(
            name=args.out.name,
            target=args.target.name,
            corpus=f"`{args.corpus.name}`" if args.corpus else "its own synthetic corpus",
            usage=(
                f"swarm-client generate TEXT --model {args.target} --greedy --draft-model {args.out}"
                if args.corpus
                else 'swarm-client generate "Once upon a time" --greedy --speculate 6 --draft-model default'
            ),
            params=params,
            hidden=args.hidden,
            layers=args.layers,
            intermediate=args.intermediate,
            steps=step,
            batch=args.batch,
            seq_len=args.seq_len,
            minutes=minutes,
            agree=agree,
            command=command,
        ),
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
