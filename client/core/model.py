"""`DistributedModelForCausalLM`: a Hugging Face causal LM whose transformer layers live in the swarm.

The client holds only the local modules (embeddings, final norm, LM head) read from the checkpoint;
`forward` embeds, sends hidden states through a chain of peers, and applies the head. Because it is a
`PreTrainedModel` with `GenerationMixin`, Hugging Face's own `generate()` (greedy, sampling, logits
processors, stopping criteria) runs unchanged on top.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarm.checkpoint import checkpoint_dir, model_name_from_path
from swarm.client.core.channel import ChannelPool
from swarm.client.core.forward import forward_through
from swarm.client.core.links import STEP_TIMEOUT
from swarm.client.core.loop import EventLoopThread
from swarm.client.core.planner import DEFAULT_FAILOVER_WAIT, ChainPlanner
from swarm.client.core.remote_cache import RemoteSessionCache
from swarm.client.core.sessions import ChainSession
from swarm.client.core.settings import ClientSettings
from swarm.client.core.training import remote_layers
from swarm.client.core.transformers_compat import RemoteCacheGenerationMixin, causal_lm_output, take_cache
from swarm.client.core.tuning import LowRankAdapter, SoftPrompt, Tuning
from swarm.client.core.verify import Verifier
from swarm.errors import SwarmError
from swarm.identity import CheckpointDigests
from swarm.models import ModelArchitecture
from swarm.models.adapters import TARGETS
from swarm.models.local import LocalModules
from swarm.protocol import CODECS, Codec

log = logging.getLogger("swarm.client")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as `generate()` derives them, counting real tokens: left padding sits at 0, padding after a real
    token (right-padded training batches) at that token's position, so positions never decrease along a row (as
    nodes require). Padding is masked, so where it sits changes no real token's result."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _kept(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions `generate()` wants logits for (`logits_to_keep`: the last N, or given indexes; 0: all)."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
    return hidden[:, logits_to_keep]


def parse_compression(compression: str | None) -> Codec:
    """The codec behind a `compression` option: None or "none" sends raw tensors."""
    if compression in (None, "none"):
        return "raw"
    if compression not in CODECS:
        raise ValueError(f"unknown compression {compression!r}; use one of none, {', '.join(CODECS[1:])}")
    return compression  # type: ignore[return-value]


class DistributedModelForCausalLM(PreTrainedModel, RemoteCacheGenerationMixin):
    """Run a causal LM whose layers are served by swarm nodes; use it like any `transformers` model."""

    base_model_prefix = "swarm"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(
        self,
        config: PretrainedConfig,
        architecture: ModelArchitecture,
        local: LocalModules,
        planner: ChainPlanner,
    ) -> None:
        super().__init__(config)
        self.architecture = architecture
        self.local = local
        self.planner = planner
        self.runner = EventLoopThread()
        self.channels = ChannelPool(planner.credentials, STEP_TIMEOUT, planner.observe_round_trip)
        self.verifier = Verifier(planner)
        """Checks sampled steps on other peers; `verifier.checks` and `verifier.caught` count what it did."""
        self.generate_calls = threading.local()
        self.tuning: Tuning | None = None
        """The soft prompt and/or adapter every call runs with unless it passes its own (`load_tuning`)."""

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        model: str | Path,
        registry: str | list[str] | None = None,
        *,
        model_name: str | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        dtype: torch.dtype = torch.float32,
        failover_wait: float = DEFAULT_FAILOVER_WAIT,
        compression: str | None = None,
        verify_rate: float | None = None,
        forwarding: bool | None = None,
    ) -> DistributedModelForCausalLM:
        """Load the local modules of checkpoint `model` and route its layers through `registry`.

        `registry`, `token` (enters a private swarm) and `tls_ca` (a private CA for `wss://` peers) default to
        `SWARM_REGISTRY`, `SWARM_TOKEN` and `SWARM_TLS_CA`, as for `swarm-client`;
        `failover_wait` is how long to wait for a lost span to be served again; `compression="int8-block"`
        sends hidden states as 8-bit blocks (~1/4 of float32's bytes, slightly inexact) to peers that
        advertise it; `verify_rate` is the fraction of steps other peers compute again to catch a lying peer
        (default `SWARM_CLIENT_VERIFY_RATE` or 0.03; 0 turns verification off); `forwarding` (default on,
        `SWARM_CLIENT_FORWARDING`) sends a session's steps node to node along its chain instead of through the
        client between every two nodes. Peers serving weights other than this checkpoint's are never used."""
        settings = ClientSettings.from_flags(
            {
                "registry": registry,
                "token": token,
                "tls_ca": tls_ca,
                "compression": compression,
                "verify_rate": verify_rate,
                "forwarding": forwarding,
            }
        )
        codec = parse_compression(settings.compression)
        config = AutoConfig.from_pretrained(checkpoint_dir(model), local_files_only=True)
        architecture = ModelArchitecture.of(model)
        local = LocalModules.load(model, architecture, dtype)
        planner = ChainPlanner(
            settings.registry,
            model_name_from_path(model, model_name),
            architecture.num_layers,
            settings.credentials(),
            failover_wait,
            codec,
            verify_rate=settings.verify_rate,
            forwarding=settings.forwarding,
            digests=CheckpointDigests(model, architecture),
        )
        instance = cls(config, architecture, local, planner)
        generation_file = checkpoint_dir(model) / "generation_config.json"
        if generation_file.is_file():
            instance.generation_config = GenerationConfig.from_pretrained(checkpoint_dir(model))
        return instance.eval()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The local modules' dtype (Hugging Face's own property walks every parameter, on every step)."""
        return self.local.embed.weight.dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.local.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.local.head

    def add_soft_prompt(self, tokens: int, init_ids: torch.Tensor | None = None, seed: int = 0) -> SoftPrompt:
        """Start training a soft prompt of `tokens` embeddings: copies of the embeddings of `init_ids` (e.g. a
        tokenized task description, repeated to length), else of randomly drawn vocabulary tokens."""
        if tokens < 1:
            raise ValueError("a soft prompt needs at least one token")
        if init_ids is None:
            generator = torch.Generator().manual_seed(seed)
            init_ids = torch.randint(0, self.config.vocab_size, (tokens,), generator=generator)
        init_ids = init_ids.flatten().repeat(tokens // max(init_ids.numel(), 1) + 1)[:tokens]
        prompt = SoftPrompt(self.local.embed.weight[init_ids].float())
        adapter = self.tuning.adapter if self.tuning is not None else None
        self.tuning = Tuning(self.planner.model_name, prompt, adapter)
        return prompt

    def add_adapter(
        self,
        rank: int,
        alpha: float | None = None,
        layers: list[int] | None = None,
        targets: tuple[str, ...] = TARGETS,
        seed: int = 0,
    ) -> LowRankAdapter:
        """Start training a low-rank adapter (LoRA) of `rank` on `targets` of `layers` (default: every layer)."""
        generator = torch.Generator().manual_seed(seed)
        adapter = LowRankAdapter(self.architecture.spec, rank, alpha, layers, targets, generator)
        prompt = self.tuning.soft_prompt if self.tuning is not None else None
        self.tuning = Tuning(self.planner.model_name, prompt, adapter)
        return adapter

    def load_tuning(self, path: str | Path) -> Tuning:
        """Run with the soft prompt and/or adapter in `path` (a file `swarm-client tune` or `Tuning.save` wrote)
        from now on; returns it (its parameters can be trained further)."""
        self.tuning = self.read_tuning(path)
        return self.tuning

    def read_tuning(self, path: str | Path) -> Tuning:
        """The tuning in `path`, checked against this model, without making it the default."""
        tuning = Tuning.load(path, self.architecture.spec)
        prompt = tuning.soft_prompt
        if prompt is not None and prompt.embeddings.shape[1] != self.local.embed.weight.shape[1]:
            raise ValueError(
                f"{path}: its soft prompt has embeddings of size {prompt.embeddings.shape[1]}, "
                f"{self.planner.model_name}'s are {self.local.embed.weight.shape[1]}"
            )
        return tuning

    @contextmanager
    def inference_session(self, max_length: int) -> Iterator[RemoteSessionCache]:
        """A cache to pass to several `generate()` calls (multi-turn chat) as `cache=` (or `past_key_values=`):
        each call then sends only the tokens the swarm has not seen yet."""
        cache = RemoteSessionCache(max_length)
        try:
            yield cache
        finally:
            self.close_cache(cache)

    def new_generation_cache(self, max_length: int) -> RemoteSessionCache:
        return RemoteSessionCache(max_length)

    def close_cache(self, cache: RemoteSessionCache) -> None:
        if cache.session is not None and not cache.closed:
            self.runner.run(cache.session.close())
        cache.closed = True

    def current_chain(self) -> list[str]:
        """Peer addresses the `generate()` running on this thread goes through (e.g. from a logits processor)."""
        call = self.current_generate_call()
        cache = call.expected if call is not None else None
        if not isinstance(cache, RemoteSessionCache) or cache.session is None:
            return []
        return [link.link.peer.address for link in cache.session.links]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        tuning: Tuning | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The swarm session comes as `cache` (transformers 5.24 on) or `past_key_values` (before). `tuning`: a
        soft prompt and/or adapter to run with instead of `self.tuning` (what `generate(..., tuning=...)` passes).

        With gradients enabled and something to train (a tuning's parameters, or `inputs_embeds` that require
        grad), the pass is differentiable through the remote layers (`swarm.client.core.training`), so
        `loss.backward()` reaches the soft prompt and the adapter."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        past_key_values = take_cache(kwargs)
        self.check_forward_cache(past_key_values, kwargs)
        tuning = tuning if tuning is not None else self.tuning
        if self._trains(tuning, inputs_embeds):
            if past_key_values is not None:
                raise ValueError("a training pass runs without a cache: call the model without past_key_values/cache")
            hidden = self._differentiable(input_ids, inputs_embeds, attention_mask, position_ids, tuning)
            logits = self.head(_kept(hidden, logits_to_keep))
        else:
            with torch.inference_mode():
                hidden = self._inference(
                    input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, tuning
                )
            with torch.no_grad():  # logits callers may change in place (assisted generation does)
                logits = self.head(_kept(hidden, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return causal_lm_output(logits, loss, past_key_values)

    @staticmethod
    def _trains(tuning: Tuning | None, inputs_embeds: torch.Tensor | None) -> bool:
        if not torch.is_grad_enabled():
            return False
        if inputs_embeds is not None and inputs_embeds.requires_grad:
            return True
        return tuning is not None and any(parameter.requires_grad for parameter in tuning.parameters())

    def _inference(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: RemoteSessionCache | None,
        tuning: Tuning | None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.local.embed(input_ids)
        batch, new_tokens = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + new_tokens, dtype=torch.long)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)[:, -new_tokens:]
        prompt = tuning.soft_prompt if tuning is not None else None
        adapter = tuning.adapter if tuning is not None else None
        if isinstance(cache, RemoteSessionCache):
            if cache.session is None and prompt is not None:  # the session's first step: the prompt goes in front
                cache.prefix_tokens = prompt.tokens
            offset = cache.prefix_tokens
            first = cache.session is None
        else:
            offset = prompt.tokens if prompt is not None else 0
            first = True
        new_mask = attention_mask[:, -new_tokens:] if isinstance(cache, RemoteSessionCache) else attention_mask
        hidden, positions, mask = self.prefixed_inputs(
            inputs_embeds, position_ids, new_mask, prompt if first else None, offset
        )
        self.check_positions(positions)
        if isinstance(cache, RemoteSessionCache):
            hidden = self.runner.run(self._session_step(cache, hidden, positions, mask, adapter))
            cache.seen_tokens += new_tokens
        else:
            hidden = self.runner.run(forward_through(self.planner, hidden, positions, mask, adapter))
        return hidden.to(self.dtype)[:, -new_tokens:]

    def _differentiable(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        tuning: Tuning | None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.local.embed(input_ids)
        batch, tokens = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, tokens, dtype=torch.long)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        prompt = tuning.soft_prompt if tuning is not None else None
        offset = prompt.tokens if prompt is not None else 0
        hidden, positions, mask = self.prefixed_inputs(inputs_embeds, position_ids, attention_mask, prompt, offset)
        self.check_positions(positions)
        adapter = tuning.adapter if tuning is not None else None
        hidden = remote_layers(self.planner, self.runner, hidden, positions, mask, adapter)
        return hidden[:, -tokens:]

    def prefixed_inputs(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt: SoftPrompt | None,
        offset: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What enters the first remote layer, its positions and mask: with `prompt`, its tokens go first (always
        attended, positions 0..P-1) and every position moves `offset` (= P, also on later steps) along."""
        if offset:
            position_ids = position_ids + offset
        if prompt is not None:
            batch = inputs_embeds.shape[0]
            embeddings = prompt.embeddings.to(inputs_embeds.dtype)[None].expand(batch, -1, -1)
            inputs_embeds = torch.cat([embeddings, inputs_embeds], dim=1)
            prefix_positions = torch.arange(prompt.tokens).expand(batch, -1)
            position_ids = torch.cat([prefix_positions, position_ids], dim=1)
            attention_mask = torch.cat(
                [torch.ones(batch, prompt.tokens, dtype=attention_mask.dtype), attention_mask], dim=1
            )
        return self.first_hidden(inputs_embeds, position_ids), position_ids, attention_mask

    def check_positions(self, position_ids: torch.Tensor) -> None:
        """Positions past the model's own (rotary or learned) are refused here, with the numbers, rather than by
        every node; ALiBi models have no such limit."""
        spec = self.architecture.spec
        if not spec.alibi and position_ids.numel() and int(position_ids.max()) >= spec.max_positions:
            raise ValueError(
                f"the sequence reaches position {int(position_ids.max())}, but {self.planner.model_name} has "
                f"{spec.max_positions} positions: shorten the prompt or ask for fewer new tokens"
            )

    def first_hidden(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """What enters the first remote layer: token embeddings plus whatever the family adds locally."""
        return self.local.first_hidden(inputs_embeds.to(self.dtype), position_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits from the last remote layer's hidden states (final norm and LM head, run here)."""
        return self.local.logits(hidden.to(self.dtype)).float()

    async def _session_step(
        self,
        cache: RemoteSessionCache,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        new_mask: torch.Tensor,
        adapter: LowRankAdapter | None,
    ) -> torch.Tensor:
        if cache.closed:
            raise SwarmError("this inference session is closed; open a new one with model.inference_session()")
        if cache.session is None:
            max_length = (cache.max_length or self.config.max_position_embeddings) + cache.prefix_tokens
            cache.session = await ChainSession.open(
                self.planner, self.channels, max_length, hidden.shape[0], self.verifier, adapter
            )
        return await cache.session.step(hidden, position_ids, new_mask, cache.take_hypo_ids())

    def close(self) -> None:
        """Stop the client's network thread; sessions still open are dropped by their peers."""
        if self.runner.loop.is_running():
            self.runner.run(self.channels.close(), timeout=10)
            self.runner.run(self.planner.close(), timeout=10)
        self.runner.close()
