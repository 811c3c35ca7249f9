"""`swarm-client generate PROMPT`: continue a prompt through the swarm, streaming to stdout."""

from __future__ import annotations

import argparse

import torch
from transformers import TextStreamer

from swarm.client.cli.resolve import open_model
from swarm.client.core.drafts import load_draft_model, speculation_kwargs
from swarm.client.core.settings import ClientSettings


def sampling_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """Map CLI flags onto `generate()` arguments; unset flags keep the checkpoint's own defaults."""
    if args.greedy:
        return {"do_sample": False}
    chosen = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    chosen = {key: value for key, value in chosen.items() if value is not None}
    return {"do_sample": True, **chosen} if chosen else {}


def run(args: argparse.Namespace, settings: ClientSettings) -> int:
    model, tokenizer = open_model(settings)
    try:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        inputs = tokenizer(args.prompt, return_tensors="pt")
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        draft = load_draft_model(args.draft_model, tokenizer, args.speculate) if args.draft_model else None
        speculation = speculation_kwargs(args.speculate, draft)
        model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            streamer=streamer,
            pad_token_id=pad,
            **sampling_kwargs(args),
            **speculation,
        )
    finally:
        model.close()
    return 0
