"""`POST /generate`: the request shape of GPT-API style servers (a prompt or a batch of prompts, Hugging Face
decoding knobs, `{"gen_text": [...]}` back), mapped onto `generate()` with its own beam search and penalties."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, Field, model_validator
from transformers import GenerationConfig, LogitsProcessorList

from swarm.client.serve.completions import CompletionEngine
from swarm.client.serve.decoding import TextAssembler
from swarm.client.serve.json_input import WHOLE, Integer, JsonRequest
from swarm.client.serve.openai_types import MAX_SEED
from swarm.client.serve.sampling import sampling_processors
from swarm.client.serve.scoring import left_pad

MAX_BATCH = 32
MAX_BAD_WORDS = 256


class GenerateRequest(JsonRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_BATCH)] = Field(
        description="Text to continue; a list is a batch with one result per prompt."
    )
    max_length: Integer = Field(
        64, ge=1, description="Most tokens to generate for each prompt (the prompt not counted)."
    )
    min_length: Integer = Field(0, ge=0, description="Fewest tokens to generate before the end of sequence may come.")
    do_sample: bool = Field(False, description="Sample (with temperature, top_k, top_p); otherwise greedy or beams.")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Sampling temperature (with do_sample).")
    top_k: Integer = Field(
        0, ge=0, le=1_000_000, description="Sample among the k likeliest tokens; 0 means all (with do_sample)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling probability mass (with do_sample).")
    repetition_penalty: float = Field(
        1.0, ge=0.01, le=10.0, description="Above 1 discourages repeating tokens, below 1 encourages it."
    )
    num_beams: Integer = Field(1, ge=1, le=16, description="Beam search width; 1 is no beam search.")
    early_stop: bool = Field(False, description="Beam search ends as soon as `num_beams` candidates are finished.")
    bad_words: list[str] = Field(
        default_factory=list, max_length=MAX_BAD_WORDS, description="Words the text must not contain."
    )
    end_sequence: str | None = Field(None, min_length=1, description="Ends a text when generated; not returned.")
    return_prompt: bool = Field(False, description="Start each text with its prompt.")
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), WHOLE] | None = Field(
        None, description="Makes sampling reproducible."
    )

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        if self.do_sample and self.num_beams > 1:
            raise ValueError("do_sample with num_beams > 1 (beam sampling) is not supported; choose one")
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) exceeds max_length ({self.max_length})")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class GenerateResponse(BaseModel):
    gen_text: list[str] = Field(description="One text per prompt, in order.")


@dataclass(frozen=True)
class GenerateJob:
    """A `/generate` request with its prompts tokenized and checked against the model's limits."""

    request: GenerateRequest
    prompts: list[list[int]]
    texts: list[str]

    @property
    def token_budget(self) -> int:
        """The most tokens it can take: its prompts, then `max_length` new ones each."""
        return sum(len(ids) for ids in self.prompts) + self.request.max_length * len(self.prompts)


def generate_job(engine: CompletionEngine, request: GenerateRequest) -> GenerateJob:
    """Tokenize and check a request; blocking (a long prompt takes a while), so servers call it in a thread."""
    prompts, texts = engine.tokenize_prompts(request.prompts)
    engine.check_context(prompts, request.max_length)
    engine.check_rows(len(prompts), request.num_beams, param="num_beams")
    return GenerateJob(request, prompts, texts)


def run_generate(engine: CompletionEngine, job: GenerateJob) -> GenerateResponse:
    """One batched `generate()` over every prompt; blocking, so servers call it from a worker thread."""
    tokenizer, request, prompts, texts = engine.tokenizer, job.request, job.prompts, job.texts
    input_ids, mask = left_pad(prompts, engine.pad_id)
    stop = [request.end_sequence] if request.end_sequence else []
    config = GenerationConfig(
        max_new_tokens=request.max_length,
        min_new_tokens=request.min_length or None,
        do_sample=False,
        num_beams=request.num_beams,
        early_stopping=request.early_stop,
        repetition_penalty=request.repetition_penalty,
        bad_words_ids=bad_words_ids(engine, request.bad_words),
        stop_strings=stop or None,
        eos_token_id=engine.eos_ids,
        pad_token_id=engine.pad_id,
    )
    processors = (
        sampling_processors(request.temperature, request.top_p, request.top_k, request.seed)
        if request.do_sample
        else []
    )
    output = engine.model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        generation_config=config,
        logits_processor=LogitsProcessorList(processors),
        tokenizer=tokenizer if stop else None,
    )
    results = []
    for row, (ids, prompt) in enumerate(zip(prompts, texts, strict=True)):
        assembler = TextAssembler(tokenizer, ids, stop, engine.eos_ids)
        for token in output[row, input_ids.shape[1] :].tolist():
            assembler.add(token)
        assembler.finish()
        results.append(prompt + assembler.text if request.return_prompt else assembler.text)
    return GenerateResponse(gen_text=results)


def bad_words_ids(engine: CompletionEngine, words: list[str]) -> list[list[int]] | None:
    """Token sequences of each word, alone and after a space (most tokenizers spell the two differently)."""
    sequences = {
        tuple(engine.tokenizer(variant, add_special_tokens=False).input_ids)
        for word in words
        for variant in (word, f" {word}")
    }
    return [list(ids) for ids in sorted(sequences) if ids] or None
