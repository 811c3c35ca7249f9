"""Running an OpenAI completions or chat completions request on a swarm model: the one implementation behind
the gateway (`swarm-client serve`) and `swarm-client batch`.

A request becomes a `GenerationJob` (prompts as token ids, checked against the context length and the batch
rows a node takes), then one batched decoding job over every prompt times every choice, on its own swarm
session. Calls are synchronous and thread-safe, so a server runs several at once in worker threads (tokenizing a
long prompt included); their jobs share the `DecodeScheduler`'s ticks, so the client's per-token work and the
nodes' forwards are batched across requests.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteriaList,
)

from swarm.client.core.drafts import DEFAULT_DRAFT_TOKENS, speculation_kwargs
from swarm.client.core.model import DistributedModelForCausalLM
from swarm.client.core.scheduler import DecodeScheduler
from swarm.client.core.tuning import Tuning
from swarm.client.serve.chat_template import chat_prompt_ids, chat_stop_strings, render_chat
from swarm.client.serve.decoding import ChoiceTracker, StepLogprobs, TextAssembler, TokenEntry
from swarm.client.serve.errors import ContextLengthExceededError, InvalidRequestError, UnknownModelError
from swarm.client.serve.openai_types import ChatCompletionRequest, CompletionRequest, Prompt, SamplingRequest, Usage
from swarm.client.serve.sampling import GREEDY_BELOW, PresenceFrequencyPenalty, sampling_processors
from swarm.client.serve.scoring import left_pad, score_sequences, token_entries

DEFAULT_COMPLETION_TOKENS = 16
DEFAULT_MAX_ROWS = 64
"""Sequences one request decodes at once (prompts x choices): a node's default `--max-batch-size`."""


@dataclass(frozen=True)
class GenerationJob:
    """What one request asks `generate()` for; `candidates` per prompt are generated, the best `n` returned."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    max_new_tokens: int
    n: int
    candidates: int
    temperature: float
    top_p: float
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    stop: list[str]
    logprobs: int | None
    echo: bool = False
    model: str = ""
    """The model name the request asked for (the base model's, or `base:tuning` for a served tuning)."""
    tuning: Tuning | None = None

    @property
    def token_budget(self) -> int:
        """The most tokens it can take: its prompts, then `max_new_tokens` for every candidate."""
        rows = len(self.prompts) * self.candidates
        return sum(len(ids) for ids in self.prompts) + self.max_new_tokens * rows


@dataclass
class Choice:
    """One returned choice; `prompt_entries` holds the prompt's tokens for `echo` with `logprobs`."""

    index: int
    prompt_index: int
    assembler: TextAssembler
    prompt_entries: list[TokenEntry] = field(default_factory=list)


@dataclass(frozen=True)
class ChoiceDelta:
    """What a streaming client gets next for one choice."""

    index: int
    text: str
    entries: list[TokenEntry]
    finish_reason: str | None = None
    offset_base: int = 0
    """Added to the entries' offsets: they count from the start of the prompt (echo) or of the completion."""


@dataclass(frozen=True)
class JobResult:
    choices: list[Choice]
    usage: Usage


DeltaSink = Callable[[list[ChoiceDelta]], None]


class CompletionEngine:
    """One model with its tokenizer, answering OpenAI-style requests."""

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        max_rows: int = DEFAULT_MAX_ROWS,
        speculate: int = 0,
        draft: PreTrainedModel | None = None,
    ) -> None:
        self.model = model
        self.draft = draft
        """Drafts for speculative decoding come from this small local model (`load_draft_model`), else from
        prompt lookup."""
        self.speculate = speculate or (DEFAULT_DRAFT_TOKENS if draft is not None else 0)
        """Drafts a step for single-sequence requests without logprobs; 0: none."""
        self.tokenizer = tokenizer
        self.name = name
        self.max_rows = max_rows
        self.context_length: int = model.config.max_position_embeddings
        longest_token = max((len(token) for token in tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = 2 * self.context_length * max(longest_token, 1)
        """No token spans more characters than the vocabulary's longest (with a margin of 2 for normalizers), so
        text longer than this cannot fit the context: it is refused without tokenizing it."""
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.generation_config.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.scheduler = DecodeScheduler(model) if isinstance(model, DistributedModelForCausalLM) else None
        self.decode = self.scheduler.generate if self.scheduler is not None else partial(greedy_generate, model)
        """Runs decoding: concurrent requests share the scheduler's ticks (a plain local model decodes alone)."""
        self.tunings: dict[str, Tuning] = {}
        """Served tunings by their model name, `<name>:<label>` (`add_tuning`)."""

    def add_tuning(self, label: str, tuning: Tuning) -> str:
        """Serve `tuning` (a soft prompt and/or adapter) as model `<name>:<label>`; returns that name."""
        if not label or ":" in label or not label.isprintable():
            raise ValueError(f"a served tuning's label must be printable, non-empty and without ':', got {label!r}")
        name = f"{self.name}:{label}"
        self.tunings[name] = tuning
        return name

    @property
    def served(self) -> list[str]:
        """Every model name this gateway answers to."""
        return [self.name, *self.tunings]

    def check_model(self, requested: str | None) -> tuple[str, Tuning | None]:
        """The name a request is answered under, and the tuning it runs with (None: the base model)."""
        if requested is None or requested == self.name:
            return self.name, None
        if requested in self.tunings:
            return requested, self.tunings[requested]
        raise UnknownModelError(
            f"model {requested!r} is not served here; this gateway serves {', '.join(map(repr, self.served))}"
        )

    def completion_job(self, request: CompletionRequest) -> GenerationJob:
        model, tuning = self.check_model(request.model)
        prompts, texts = self.tokenize_prompts(request.prompt)
        max_new = DEFAULT_COMPLETION_TOKENS if request.max_tokens is None else request.max_tokens
        job = self._job(request, prompts, texts, max_new, request.logprobs, request.echo, request.best_of)
        return dataclasses.replace(job, model=model, tuning=tuning)

    def chat_job(self, request: ChatCompletionRequest) -> GenerationJob:
        model, tuning = self.check_model(request.model)
        messages = [{"role": message.role, "content": message.text} for message in request.messages]
        text = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        self._check_characters(text, "messages")
        ids = chat_prompt_ids(self.tokenizer, text)
        limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        max_new = self.context_length - len(ids) if limit is None else limit
        top = (request.top_logprobs or 0) if request.logprobs else None
        job = self._job(request, [ids], [text], max_new, top, echo=False, best_of=None)
        extra_stops = [stop for stop in chat_stop_strings(self.tokenizer) if stop not in job.stop]
        return dataclasses.replace(job, stop=job.stop + extra_stops, model=model, tuning=tuning)

    def run(
        self, job: GenerationJob, on_delta: DeltaSink | None = None, cancel: threading.Event | None = None
    ) -> JobResult:
        """Generate every choice of `job`; `on_delta` receives text as it is released (streaming)."""
        rows = [p for p in range(len(job.prompts)) for _ in range(job.candidates)]
        assemblers = [TextAssembler(self.tokenizer, job.prompts[p], job.stop, self.eos_ids) for p in rows]
        prompt_entries = self._echo_entries(job)
        if on_delta is not None and job.echo:
            on_delta([ChoiceDelta(i, job.prompt_texts[p], prompt_entries[p]) for i, p in enumerate(rows)])
        release = _Releases(on_delta, assemblers, [len(job.prompt_texts[p]) for p in rows])
        if job.max_new_tokens > 0:
            self._generate(job, [job.prompts[p] for p in rows], assemblers, release, cancel)
        for assembler in assemblers:
            assembler.finish()
        release()
        choices = [Choice(i, p, a, prompt_entries[p]) for i, (p, a) in enumerate(zip(rows, assemblers, strict=True))]
        prompt_tokens = sum(len(ids) for ids in job.prompts)
        completion_tokens = sum(a.token_count for a in assemblers)
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return JobResult(_best_choices(choices, job), usage)

    def _job(
        self,
        request: SamplingRequest,
        prompts: list[list[int]],
        texts: list[str],
        max_new: int,
        logprobs: int | None,
        echo: bool,
        best_of: int | None,
    ) -> GenerationJob:
        self.check_context(prompts, max_new, param="max_tokens")
        self.check_rows(len(prompts), best_of or request.n, param="best_of" if best_of else "n")
        return GenerationJob(
            prompts=prompts,
            prompt_texts=texts,
            max_new_tokens=max_new,
            n=request.n,
            candidates=best_of or request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            stop=request.stop_sequences,
            logprobs=logprobs,
            echo=echo,
        )

    def check_context(self, prompts: list[list[int]], max_new: int, param: str = "max_tokens") -> None:
        """Refuse what cannot fit in the model's context (positions beyond it were never trained)."""
        longest = max(len(ids) for ids in prompts)
        if longest >= self.context_length or longest + max_new > self.context_length:
            raise ContextLengthExceededError(
                f"this model's context is {self.context_length} tokens, but the prompt has {longest} tokens and "
                f"{max(max_new, 0)} more were asked for; shorten the prompt or ask for fewer tokens",
                param=param,
            )

    def check_rows(self, prompts: int, per_prompt: int, param: str) -> None:
        """Refuse more sequences than one swarm session may decode at once (a node's batch limit)."""
        if prompts * per_prompt > self.max_rows:
            raise InvalidRequestError(
                f"{prompts} prompt(s) x {per_prompt} = {prompts * per_prompt} sequences, but this gateway decodes at "
                f"most {self.max_rows} per request; send fewer prompts or choices per request",
                param=param,
            )

    def _check_characters(self, text: str, param: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise ContextLengthExceededError(
                f"this model's context is {self.context_length} tokens, and a prompt of {len(text)} characters "
                "cannot fit in it; shorten the prompt",
                param=param,
            )

    def tokenize_prompts(self, prompt: Prompt) -> tuple[list[list[int]], list[str]]:
        """Prompts as token ids and as text, whichever form the request used."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if all(isinstance(item, int) for item in prompt):
            prompt = [prompt]  # type: ignore[list-item]
        ids: list[list[int]] = []
        for item in prompt:
            if isinstance(item, str):
                self._check_characters(item, "prompt")
            tokens = self.tokenizer(item).input_ids if isinstance(item, str) else list(item)  # type: ignore[arg-type]
            if not tokens:
                raise InvalidRequestError("prompt: an empty prompt has no token to continue from", param="prompt")
            if not all(0 <= token < self.model.config.vocab_size for token in tokens):
                raise InvalidRequestError(
                    f"prompt: token ids must be in [0, {self.model.config.vocab_size})", param="prompt"
                )
            ids.append(tokens)
        texts = [
            item if isinstance(item, str) else self.tokenizer.decode(tokens)
            for item, tokens in zip(prompt, ids, strict=True)
        ]
        return ids, texts

    def _echo_entries(self, job: GenerationJob) -> list[list[TokenEntry]]:
        """The prompts' tokens with their logprobs (from a stateless forward), when `echo` and `logprobs` ask."""
        if not job.echo or job.logprobs is None:
            return [[] for _ in job.prompts]
        scores = score_sequences(self.model, job.prompts, self.pad_id, alternatives=job.logprobs, tuning=job.tuning)
        return [token_entries(self.tokenizer, score) for score in scores]

    def _generate(
        self,
        job: GenerationJob,
        rows: list[list[int]],
        assemblers: list[TextAssembler],
        on_step: Callable[[], None],
        cancel: threading.Event | None,
    ) -> None:
        input_ids, mask = left_pad(rows, self.pad_id)
        processors: list[LogitsProcessor] = []
        if job.presence_penalty or job.frequency_penalty:
            processors.append(PresenceFrequencyPenalty(input_ids.shape[1], job.presence_penalty, job.frequency_penalty))
        processors += sampling_processors(job.temperature, job.top_p, seed=job.seed)
        if self._speculates(job, len(rows)):
            self._speculative(job, input_ids, mask, processors, assemblers, on_step, cancel)
            return
        recorder = StepLogprobs()
        tracker = ChoiceTracker(assemblers, recorder, job.logprobs or 0, on_step, cancel)
        self.decode(
            input_ids,
            mask,
            max_new_tokens=job.max_new_tokens,
            logits_processor=LogitsProcessorList([recorder, *processors]),
            stopping_criteria=StoppingCriteriaList([tracker]),
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            **({"tuning": job.tuning} if job.tuning is not None else {}),
        )

    def _speculates(self, job: GenerationJob, rows: int) -> bool:
        """Speculative decoding serves one sequence without logprobs (drafted tokens come several a step, without
        a distribution each): greedy, or sampled when a draft model drafts (see `_speculative`). Prompt lookup
        would not pay for sampled requests: transformers drops each looked-up candidate its processors mask, and
        the seeded sampler masks all but its own draw, so the request would only leave the batched lane."""
        if not self.speculate or rows != 1 or job.logprobs is not None or job.echo:
            return False
        return job.temperature < GREEDY_BELOW or (self.draft is not None and job.tuning is None)

    def _speculative(
        self,
        job: GenerationJob,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        processors: list[LogitsProcessor],
        assemblers: list[TextAssembler],
        on_step: Callable[[], None],
        cancel: threading.Event | None,
    ) -> None:
        """One sequence through `generate()` with drafts checked by the swarm in one step each. `generate()` runs
        the request's `processors` (penalties, then the seeded sampler) on the swarm's logits at every drafted
        position given the tokens before it, and keeps drafts while they are what it picked there: each kept token
        is then the one the request's own sampling gave, so the output keeps its distribution (a seed draws other
        tokens than without drafts, the same ones every time). A tuned request drafts by prompt lookup: the draft
        model knows nothing of its soft prompt or adapter."""
        tracker = ChoiceTracker(assemblers, None, 0, on_step, cancel, prompt_length=input_ids.shape[1])
        speculation = speculation_kwargs(self.speculate, self.draft if job.tuning is None else None)
        config = GenerationConfig(
            max_new_tokens=job.max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            prompt_lookup_num_tokens=speculation.pop("prompt_lookup_num_tokens", None),
        )
        self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([tracker]),
            **speculation,
            **({"tuning": job.tuning} if job.tuning is not None else {}),
        )

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()


def greedy_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    eos_token_id: list[int],
    pad_token_id: int,
) -> torch.Tensor:
    """`DecodeScheduler.generate`'s contract on a model of one process (no swarm): Hugging Face's own loop."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
    )


class _Releases:
    """After each step, hands every choice's newly released text to a streaming sink; reports each finish once."""

    def __init__(self, sink: DeltaSink | None, assemblers: list[TextAssembler], offsets: list[int]) -> None:
        self.sink = sink
        self.assemblers = assemblers
        self.offsets = offsets
        self.reported: set[int] = set()

    def __call__(self) -> None:
        if self.sink is None:
            return
        deltas = []
        for index, assembler in enumerate(self.assemblers):
            text, entries = assembler.take()
            finish = assembler.finish_reason if index not in self.reported else None
            if finish is not None:
                self.reported.add(index)
            deltas.append(ChoiceDelta(index, text, entries, finish, self.offsets[index]))
        self.sink(deltas)


def _best_choices(choices: list[Choice], job: GenerationJob) -> list[Choice]:
    """With `best_of`, keep each prompt's `n` candidates of highest mean token logprob, renumbered."""
    if job.candidates == job.n:
        return choices
    kept: list[Choice] = []
    for prompt_index in range(len(job.prompts)):
        candidates = [choice for choice in choices if choice.prompt_index == prompt_index]
        candidates.sort(key=_mean_logprob, reverse=True)
        kept += candidates[: job.n]
    for index, choice in enumerate(kept):
        choice.index = index
    return kept


def _mean_logprob(choice: Choice) -> float:
    values = [entry.logprob for entry in choice.assembler.entries if entry.logprob is not None]
    return sum(values) / len(values) if values else float("-inf")
