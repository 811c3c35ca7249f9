"""Continuous batching on the client: concurrent generation jobs advance together, one tick at a time.

A server (the gateway, `swarm-client batch`) answers many requests at once. Run as one Hugging Face
`generate()` per thread, every request pays the whole per-token Python cost on its own, under one GIL. Here
each job keeps its own swarm session (its own caches on the peers, its own failover), but the jobs share
ticks: each tick embeds every job's new tokens in one call, sends every job's step at the same moment (so a
node runs them as one batched forward), and applies the LM head to every job's last hidden state in one call.
Jobs join and leave between ticks. A new job's first step (opening its sessions, then its prompt) runs in the
background and joins a tick once it is done: a slow or failing peer on one new job's way never holds up the
jobs already decoding.

Decoding is `generate()`'s greedy loop: the job's logits processors, then argmax, finished rows padded, the
job's stopping criteria after each token. Sampling is a processor (`swarm.client.serve.sampling.SeededSampler`), so the
same loop serves it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from swarm.client.core.addresses import address_kind
from swarm.client.core.grouped_steps import step_together
from swarm.client.core.model import DistributedModelForCausalLM, position_ids_from_mask
from swarm.client.core.sessions import ChainSession
from swarm.client.core.tuning import Tuning

log = logging.getLogger("swarm.client")


@dataclass
class DecodeJob:
    """One `generate` call: its rows (left-padded), how to pick and stop tokens, and where it stands."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new_tokens: int
    processors: LogitsProcessorList
    stopping: StoppingCriteriaList
    eos_ids: torch.Tensor
    pad_id: int
    tuning: Tuning | None = None
    """The soft prompt and/or adapter this job runs with (None: the model's own `tuning`)."""
    result: Future[torch.Tensor] = field(default_factory=Future)
    session: ChainSession | None = None
    prefill: Future[torch.Tensor] | None = None
    """The first step (sessions opened, prompt sent), running in the background until a tick takes its output."""
    decoding: bool = False
    """The prompt's output was taken: every further step is one new token."""
    generated: int = 0
    unfinished: torch.Tensor = field(init=False)
    last_positions: torch.Tensor = field(init=False)
    """Each row's position of its last token sent to the swarm."""

    def __post_init__(self) -> None:
        self.unfinished = torch.ones(self.input_ids.shape[0], dtype=torch.bool)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prefilled(self) -> bool:
        """The first step is done (or failed) and waits for a tick to take its output."""
        return not self.decoding and self.prefill is not None and self.prefill.done()

    @property
    def prefix_tokens(self) -> int:
        """Soft-prompt tokens in front of the job's rows: every position it sends is this far along."""
        return self.tuning.soft_prompt.tokens if self.tuning is not None and self.tuning.soft_prompt else 0

    def next_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids the swarm has not seen yet, their positions, and their part of the attention mask. Positions
        come from the prompt's mask once; every new token is real, one position past its row's last."""
        if not self.decoding:
            positions = position_ids_from_mask(self.attention_mask) + self.prefix_tokens
            self.last_positions = positions[:, -1]
            return self.input_ids, positions, self.attention_mask
        self.last_positions = self.last_positions + 1
        return self.input_ids[:, -1:], self.last_positions[:, None], self.attention_mask[:, -1:]

    def choose(self, logits: torch.Tensor) -> None:
        """Pick every row's next token from the last position's logits, exactly as greedy `generate()` does."""
        scores = self.processors(self.input_ids, logits)
        tokens = scores.argmax(dim=-1)
        tokens = torch.where(self.unfinished, tokens, torch.full_like(tokens, self.pad_id))
        self.input_ids = torch.cat([self.input_ids, tokens[:, None]], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)
        self.generated += 1
        stop = self.stopping(self.input_ids, scores) if self.stopping else torch.zeros(self.rows, dtype=torch.bool)
        stop = stop | torch.isin(tokens, self.eos_ids)
        self.unfinished &= ~stop

    @property
    def done(self) -> bool:
        return self.generated >= self.max_new_tokens or not bool(self.unfinished.any())


class DecodeScheduler:
    """Runs concurrent `generate` calls (from any threads) as continuously batched decoding loops.

    Jobs are spread over lanes, loops that tick independently, each on its own thread: while one lane's
    steps are on one peer, another lane's can be on the next, so the peers of a chain (and the client)
    work at the same time instead of in turn. That needs cores for them to work on: when the client and
    every peer it talks to share this machine's cores and there are fewer cores than processes
    (`shares_cores`), a second lane only makes them take turns on the cores more often, and new jobs go to
    the first lane. Measured on 2 cores with a 2-node loopback swarm, 16 tiny sessions made 525 tok/s on
    two lanes and 730 on one; 8 sessions of a hidden-512 model 118 and 126.

    `lanes`: a fixed number of lanes, all of them used; by default two, the second only where the cores
    allow."""

    def __init__(self, model: DistributedModelForCausalLM, lanes: int | None = None) -> None:
        if lanes is not None and lanes < 1:
            raise ValueError("a scheduler needs at least one lane")
        self.model = model
        self._lanes = [_Lane(self._tick, self._fail_all, f"swarm-decode-{index}") for index in range(lanes or 2)]
        self._fixed_lanes = lanes is not None
        self._assign_lock = threading.Lock()

    @property
    def ticks(self) -> int:
        """Ticks run so far over all lanes; with concurrent jobs it grows slower than their tokens."""
        return sum(lane.ticks for lane in self._lanes)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        tuning: Tuning | None = None,
    ) -> torch.Tensor:
        """Like greedy `model.generate(...)`: the prompt rows followed by their new tokens. Blocks until done.
        `tuning`: a soft prompt and/or adapter for this call (default: the model's own `tuning`)."""
        vocab = self.model.config.vocab_size
        if input_ids.ndim != 2 or input_ids.numel() == 0 or input_ids.min() < 0 or input_ids.max() >= vocab:
            raise ValueError(
                f"input_ids must be a non-empty [batch, tokens] tensor of ids in the vocabulary [0, {vocab})"
            )
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        tuning = tuning if tuning is not None else self.model.tuning
        prefix = tuning.soft_prompt.tokens if tuning is not None and tuning.soft_prompt is not None else 0
        last = prefix + int(mask.sum(dim=1).max()) + max(max_new_tokens, 1) - 2  # the position of the last token sent
        self.model.check_positions(torch.tensor([[last]]))
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        job = DecodeJob(
            input_ids=input_ids.long(),
            attention_mask=(attention_mask if attention_mask is not None else torch.ones_like(input_ids)).long(),
            max_new_tokens=max_new_tokens,
            processors=logits_processor or LogitsProcessorList(),
            stopping=stopping_criteria or StoppingCriteriaList(),
            eos_ids=torch.tensor(eos, dtype=torch.long),
            pad_id=pad,
            tuning=tuning,
        )
        if max_new_tokens <= 0:
            return job.input_ids
        with self._assign_lock:
            lane = min(self._lanes[: self.open_lanes], key=lambda lane: lane.rows)
            lane.submit(job)
        return job.result.result()

    @property
    def open_lanes(self) -> int:
        """How many lanes a new job may go to (the first ones)."""
        if self._fixed_lanes:
            return len(self._lanes)
        addresses = [channel.address for channel in self.model.channels.channels]
        return 1 if shares_cores(addresses, os.cpu_count()) else len(self._lanes)

    def close(self) -> None:
        """Stop the loops once the jobs they hold have finished."""
        for lane in self._lanes:
            lane.close()

    def _fail_all(self, jobs: list[DecodeJob], error: Exception) -> None:
        self._end([(job, error) for job in jobs])

    def _end(self, endings: list[tuple[DecodeJob, torch.Tensor | BaseException]]) -> None:
        """Close the jobs' swarm sessions, then hand each caller its output or its error."""
        for job, _ in endings:
            if job.prefill is not None:
                job.prefill.cancel()  # a first step still running (the lane failed): its session is closed below
        try:
            self.model.runner.run(self._close_all([job for job, _ in endings]))
        finally:
            for job, outcome in endings:
                if job.result.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.result.set_exception(outcome)
                else:
                    job.result.set_result(outcome)

    def _tick(self, jobs: list[DecodeJob]) -> list[DecodeJob]:
        """Advance every decoding job by one token, and take the first token of every job whose first step has
        finished; returns the jobs still running."""
        with torch.inference_mode():
            for job in jobs:
                if job.prefill is None:
                    job.prefill = self.model.runner.submit(self._prefill(job, *self._prompt_inputs(job)))
        decoding = [job for job in jobs if job.decoding]
        if not decoding and not any(job.prefilled for job in jobs):  # nothing to do until a first step is done
            concurrent.futures.wait(
                [job.prefill for job in jobs if job.prefill], return_when=concurrent.futures.FIRST_COMPLETED
            )
        prefilled = [job for job in jobs if job.prefilled]
        stepping = decoding + prefilled
        failed: dict[int, BaseException] = {}
        with torch.inference_mode():
            outcomes: list[torch.Tensor | BaseException] = []
            if decoding:
                together = self._inputs(decoding)
                sessions = [job.session for job in decoding if job.session is not None]
                outcomes = self.model.runner.run(self._step_together(sessions, together, len(decoding)))
            for job in prefilled:
                assert job.prefill is not None
                error = job.prefill.exception()
                outcomes.append(error if error is not None else job.prefill.result())
                job.decoding = True
            stepped = []
            for index, (job, out) in enumerate(zip(stepping, outcomes, strict=True)):
                if isinstance(out, BaseException):
                    failed[index] = out
                else:
                    stepped.append((index, job, out))
            if stepped:
                logits = self.model.head(torch.cat([out[:, -1:] for _, _, out in stepped]))[:, -1]
                row = 0
                for index, job, _ in stepped:
                    try:
                        job.choose(logits[row : row + job.rows])
                    except Exception as exc:  # a processor or stopping criterion failed: only its job ends
                        failed[index] = exc
                    row += job.rows
        ending = [index for index, job in enumerate(stepping) if index in failed or job.done]
        if ending:
            self._end([(stepping[index], failed.get(index, stepping[index].input_ids)) for index in ending])
        ended = {id(stepping[index]) for index in ending}
        return [job for job in jobs if id(job) not in ended]

    def _inputs(self, jobs: list[DecodeJob]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The jobs' new tokens as hidden states entering the first layer, with their positions and mask, their
        rows stacked: one embedding call for all of them (every decoding job has one new token)."""
        inputs = [job.next_inputs() for job in jobs]
        ids, positions, masks = (torch.cat([job_inputs[part] for job_inputs in inputs]) for part in range(3))
        return self.model.first_hidden(self.model.local.embed(ids), positions), positions, masks

    @staticmethod
    async def _step_together(
        sessions: list[ChainSession], together: tuple[torch.Tensor, torch.Tensor, torch.Tensor], jobs: int
    ) -> list[torch.Tensor | BaseException]:
        """The decoding jobs' steps, together (see `grouped_steps`)."""
        try:
            return await step_together(sessions, *together)
        except Exception as exc:  # a bug in the group's own code: every decoding job fails with it
            return [exc] * jobs

    def _prompt_inputs(self, job: DecodeJob) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A new job's prompt as hidden states entering the first layer, with its soft prompt in front (if any)."""
        ids, positions, mask = job.next_inputs()
        prompt = job.tuning.soft_prompt if job.tuning is not None else None
        embeddings = self.model.local.embed(ids)
        return self.model.prefixed_inputs(embeddings, positions - job.prefix_tokens, mask, prompt, job.prefix_tokens)

    async def _prefill(
        self, job: DecodeJob, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """A new job's first step: open its session through the swarm and send it the prompt."""
        max_length = job.prefix_tokens + job.input_ids.shape[1] + job.max_new_tokens
        adapter = job.tuning.adapter if job.tuning is not None else None
        job.session = await ChainSession.open(
            self.model.planner, self.model.channels, max_length, job.rows, self.model.verifier, adapter
        )
        return await job.session.step(hidden, positions, mask)

    @staticmethod
    async def _close_all(jobs: list[DecodeJob]) -> None:
        closing = [job.session.close() for job in jobs if job.session is not None]
        for outcome in await asyncio.gather(*closing, return_exceptions=True):
            if isinstance(outcome, BaseException):  # peers drop a session when its connection closes anyway
                log.debug("closing a finished job's session: %s", outcome)


def shares_cores(addresses: list[str], cores: int | None) -> bool:
    """Whether the client and the peers at `addresses` take turns on this machine's `cores`: every peer is on
    this machine (a loopback address) and there are fewer cores than processes (the client and each peer).
    No peers yet: unknown, so no."""
    if not addresses or not all(address_kind(address) == "loopback" for address in addresses):
        return False
    return (cores or 1) < 1 + len(set(addresses))


class _Lane:
    """Jobs that tick together, on a thread of their own that runs while the lane has jobs."""

    def __init__(
        self,
        tick: Callable[[list[DecodeJob]], list[DecodeJob]],
        fail_all: Callable[[list[DecodeJob], Exception], None],
        name: str,
    ) -> None:
        self._tick = tick
        self._fail_all = fail_all
        self._name = name
        self._arrivals: queue.SimpleQueue[DecodeJob | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._rows_lock = threading.Lock()
        self.rows = 0
        """Rows of the jobs given to this lane and not finished yet (the scheduler fills the emptiest lane)."""
        self.ticks = 0

    def submit(self, job: DecodeJob) -> None:
        with self._rows_lock:
            self.rows += job.rows
        job.result.add_done_callback(lambda _: self._finished(job))
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._arrivals.put(job)

    def _finished(self, job: DecodeJob) -> None:
        with self._rows_lock:
            self.rows -= job.rows

    def close(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                self._arrivals.put(None)
                self._thread.join()
                self._thread = None

    def _loop(self) -> None:
        running: list[DecodeJob] = []
        closing = False
        while running or not closing:
            try:
                arrival = self._arrivals.get(block=not running)
                while True:
                    if arrival is None:
                        closing = True
                    else:
                        running.append(arrival)
                    arrival = self._arrivals.get_nowait()
            except queue.Empty:
                pass
            if running:
                self.ticks += 1
                try:
                    running = self._tick(running)
                except Exception as exc:  # a bug or a broken input must not leave callers waiting forever
                    log.exception("decoding tick failed; ending its %d job(s)", len(running))
                    self._fail_all(running, exc)
                    running = []
