"""`POST /generate`: the request shape of GPT-API style servers (a prompt or a batch of prompts, Hugging Face
decoding knobs, `{"gen_text": [...]}` back), mapped onto `generate()` with its own beam search and penalties."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import GenerationConfig, LogitsProcessorList

from swarm.client.serve.completions import CompletionEngine
from swarm.client.serve.decoding import TextAssembler
from swarm.client.serve.sampling import sampling_processors
from swarm.client.serve.scoring import left_pad

MAX_BATCH = 32


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str] = Field(description="Text to continue; a list is a batch with one result per prompt.")
    max_length: int = Field(64, ge=1, description="Most tokens to generate for each prompt (the prompt not counted).")
    min_length: int = Field(0, ge=0, description="Fewest tokens to generate before the end of sequence may come.")
    do_sample: bool = Field(False, description="Sample (with temperature, top_k, top_p); otherwise greedy or beams.")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Sampling temperature (with do_sample).")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0 means all (with do_sample).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling probability mass (with do_sample).")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="Above 1 discourages repeating tokens.")
    num_beams: int = Field(1, ge=1, le=16, description="Beam search width; 1 is no beam search.")
    early_stop: bool = Field(False, description="Beam search ends as soon as `num_beams` candidates are finished.")
    bad_words: list[str] = Field(default_factory=list, description="Words the text must not contain.")
    end_sequence: str | None = Field(None, min_length=1, description="Ends a text when generated; not returned.")
    return_prompt: bool = Field(False, description="Start each text with its prompt.")
    seed: int | None = Field(None, ge=0, description="Makes sampling reproducible.")

    @model_validator(mode="after")
    def _check(self) -> GenerateRequest:
        if self.do_sample and self.num_beams > 1:
            raise ValueError("do_sample with num_beams > 1 (beam sampling) is not supported; choose one")
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) exceeds max_length ({self.max_length})")
        if isinstance(self.prompt, list) and not 1 <= len(self.prompt) <= MAX_BATCH:
            raise ValueError(f"prompt: a batch holds 1 to {MAX_BATCH} prompts")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class GenerateResponse(BaseModel):
    gen_text: list[str] = Field(description="One text per prompt, in order.")


def run_generate(engine: CompletionEngine, request: GenerateRequest) -> GenerateResponse:
    """One batched `generate()` over every prompt; blocking, so servers call it from a worker thread."""
    tokenizer = engine.tokenizer
    prompts, texts = engine.tokenize_prompts(request.prompts)
    engine.check_context(prompts, request.max_length)
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
