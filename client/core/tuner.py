"""Training a soft prompt or an adapter on prompt/completion pairs, resumably: the loop behind `swarm-client tune`.

The loop is an ordinary torch one (AdamW over the tuning's parameters, loss on the completions' tokens only);
what makes it swarm training is only that the model's forward is differentiable through the remote layers. Which
examples make step k's batch depends on the seed and k alone, and the optimizer's state is saved with the
tuning, so a run stopped at any saved step and started again continues exactly where it was.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from swarm.client.core.tuning import Tuning, read_tuning_file

IGNORED = -100
"""The label of a token that adds nothing to the loss (the prompt's, and padding): transformers' convention."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def read_examples(path: str | Path, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[Example]:
    """JSONL lines with "prompt" and "completion" strings; the completion ends with the end-of-text token when the
    tokenizer has one, so the model learns to stop."""
    examples = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not all(
                isinstance(record.get(k), str) for k in ("prompt", "completion")
            ):
                raise ValueError(f"{path}:{number}: each line needs string fields 'prompt' and 'completion'")
            prompt = tokenizer(record["prompt"]).input_ids
            completion = tokenizer(record["completion"], add_special_tokens=False).input_ids
            if tokenizer.eos_token_id is not None:
                completion = [*completion, tokenizer.eos_token_id]
            ids = (prompt + completion)[:max_tokens]
            labels = ([IGNORED] * len(prompt) + completion)[:max_tokens]
            if all(label == IGNORED for label in labels):
                raise ValueError(f"{path}:{number}: no completion token fits in {max_tokens} tokens")
            examples.append(Example(ids, labels))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (padding ignored by the loss)."""
    longest = max(len(example.input_ids) for example in examples)
    ids, mask, labels = [], [], []
    for example in examples:
        padding = longest - len(example.input_ids)
        ids.append(example.input_ids + [pad_id] * padding)
        mask.append([1] * len(example.input_ids) + [0] * padding)
        labels.append(example.labels + [IGNORED] * padding)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


@dataclass(frozen=True)
class TuneConfig:
    steps: int
    batch_size: int = 4
    learning_rate: float = 1e-2
    seed: int = 0


class TunableModel(Protocol):
    """What the loop needs of a model: a forward taking the batch and the tuning, returning `.loss`."""

    def __call__(
        self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, tuning: Tuning
    ) -> Any: ...


class Tuner:
    """Trains `tuning` on `examples` through `model`, from step `start` (0, or where a saved run stopped)."""

    def __init__(
        self, model: TunableModel, tuning: Tuning, examples: list[Example], config: TuneConfig, pad_id: int
    ) -> None:
        self.model = model
        self.tuning = tuning
        self.examples = examples
        self.config = config
        self.pad_id = pad_id
        self.parameters = dict(tuning.named_parameters())
        self.optimizer = torch.optim.AdamW(self.parameters.values(), lr=config.learning_rate, weight_decay=0.0)
        self.step_done = 0
        """Steps taken so far (and the index of the next one)."""

    def batch(self, step: int) -> list[Example]:
        """Step `step`'s examples: the seed's shuffle of the examples for each pass over them, taken in order."""
        size, count = self.config.batch_size, len(self.examples)
        chosen = []
        for position in range(step * size, (step + 1) * size):
            epoch, index = divmod(position, count)
            order = list(range(count))
            random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
            chosen.append(self.examples[order[index]])
        return chosen

    def train_step(self) -> float:
        """One optimizer step; returns its loss (before the update)."""
        self.optimizer.zero_grad(set_to_none=True)
        output = self.model(**collate(self.batch(self.step_done), self.pad_id), tuning=self.tuning)
        output.loss.backward()
        self.optimizer.step()
        self.step_done += 1
        return float(output.loss.detach())

    def run(self, on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """Steps until `config.steps`; `on_step(step, loss)` after each (progress, saving)."""
        losses = []
        while self.step_done < self.config.steps:
            loss = self.train_step()
            losses.append(loss)
            if on_step is not None:
                on_step(self.step_done, loss)
        return losses

    def save(self, path: str | Path, losses: Iterable[float] = ()) -> None:
        """The tuning, and beside it (`<path>.state`) what resuming needs: the optimizer's state, the step, the
        configuration and the losses so far."""
        state = self.optimizer.state_dict()
        names = list(self.parameters)
        tensors = {}
        for index, values in state["state"].items():
            for key, value in values.items():
                tensors[f"{names[index]}.{key}"] = torch.as_tensor(value).clone().contiguous()
        metadata = {
            "step": str(self.step_done),
            "config": json.dumps(asdict(self.config)),
            "losses": json.dumps(list(losses)),
            "param_groups": json.dumps(state["param_groups"]),
        }
        save_file(tensors, str(state_path(path)), metadata=metadata)
        self.tuning.save(path, extra={"step": str(self.step_done)})

    def resume(self, path: str | Path) -> list[float]:
        """Continue a run `save` wrote: the tuning's values, the optimizer's state and the step; returns the
        losses recorded so far. The configuration must be the one the run started with."""
        from safetensors import safe_open

        with safe_open(str(state_path(path)), framework="pt") as handle:
            metadata = handle.metadata() or {}
        saved = TuneConfig(**json.loads(metadata["config"]))
        if (saved.batch_size, saved.learning_rate, saved.seed) != (
            self.config.batch_size,
            self.config.learning_rate,
            self.config.seed,
        ):
            raise ValueError(
                f"{path} was trained with {saved}; resume it with the same --batch-size, --learning-rate and "
                "--seed, or start over with --restart"
            )
        tensors, _ = read_tuning_file(path)
        for name, parameter in self.parameters.items():
            stored = _stored_name(name)
            if stored not in tensors or tensors[stored].shape != parameter.shape:
                raise ValueError(f"{path} does not hold {name} of shape {list(parameter.shape)}: start over")
            parameter.data.copy_(tensors[stored])
        stored_state = load_file(str(state_path(path)))
        names = list(self.parameters)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in stored_state.items():
            name, _, field = key.rpartition(".")
            state.setdefault(names.index(name), {})[field] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
        self.step_done = int(metadata["step"])
        return list(json.loads(metadata["losses"]))


def state_path(path: str | Path) -> Path:
    return Path(f"{path}.state")


def _stored_name(parameter: str) -> str:
    """Where `Tuning.save` keeps a parameter: `soft_prompt.embeddings` as `soft_prompt`, `adapter.pairs.X` as
    `adapter.X`."""
    if parameter == "soft_prompt.embeddings":
        return "soft_prompt"
    return parameter.replace("adapter.pairs.", "adapter.", 1)
