"""Build swarm's default tiny Llama checkpoint from nothing but this file.

The project needs a real Hugging Face Llama checkpoint that loads offline, is
small enough to ship inside the package, and writes readable text so that
end-to-end runs can be judged by eye. No model hub is reachable, so this
script makes everything itself, deterministically from ``--seed``:

1. a synthetic corpus of simple children's stories from a hand-written
   probabilistic grammar (TinyStories-like),
2. a byte-level BPE tokenizer trained on that corpus,
3. a small ``LlamaForCausalLM`` trained from scratch on CPU within a time
   budget (or for an exact ``--steps`` count, for bit-exact rebuilds),
4. the saved folder (safetensors, tokenizer, generation config, README),
   followed by a few greedy and sampled continuations.

Usage::

    python scripts/build_default_model.py --out swarm/default_model/tiny-stories \
        --minutes 12 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
PROMPT = "Once upon a time"

# --------------------------------------------------------------------------
# Story grammar
# --------------------------------------------------------------------------

GIRLS = ["Lily", "Mia", "Emma", "Sue", "Anna", "Lucy", "Amy", "Zoe", "Ella", "Sara", "Kim", "Rose"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Jack", "Leo", "Tim", "Jake", "Finn", "Noah", "Bob", "Joe"]
ANIMALS = ["cat", "dog", "bunny", "bird", "bear", "duck", "mouse", "frog", "fox", "pig", "puppy"]
PET_GIRLS = ["Bella", "Daisy", "Coco", "Fluffy", "Lulu"]
PET_BOYS = ["Rex", "Buddy", "Milo", "Spot", "Pip"]
KID_ADJS = ["little", "happy", "kind", "curious", "brave", "shy", "small", "cheerful"]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white"]
TOYS = [
    "ball",
    "kite",
    "teddy bear",
    "doll",
    "toy car",
    "hat",
    "book",
    "balloon",
    "toy boat",
    "drum",
]
TREATS = ["cookies", "apples", "candies", "cupcakes", "grapes", "sandwiches", "strawberries"]
HIDING = [
    "under a big tree",
    "behind a rock",
    "in the tall grass",
    "under a bush",
    "next to the pond",
    "under the bench",
    "behind the old fence",
    "in a pile of leaves",
]
PLACES = {  # name -> things to do there
    "park": ["play on the swings", "go down the slide", "run on the grass", "play catch"],
    "beach": ["build a sand castle", "look for shells", "splash in the water", "dig in the sand"],
    "forest": ["look at the tall trees", "pick flowers", "listen to the birds", "walk on the path"],
    "garden": ["water the flowers", "look for bugs", "smell the roses", "dig in the dirt"],
    "farm": ["feed the chickens", "pet the cows", "ride in the hay", "see the baby pigs"],
    "lake": ["throw stones in the water", "watch the ducks", "sit on the dock", "look for fish"],
    "hill": ["roll down the grass", "fly a kite", "look at the clouds", "run to the top"],
}
OUTSIDE = ["play", "ride a bike", "fly a kite"]
INDOORS = ["read books", "told funny stories", "ate cookies", "played games"]
HOBBIES = [
    "play outside",
    "draw pictures",
    "sing songs",
    "read books",
    "dance",
    "jump in puddles",
    "look at the stars",
    "play with blocks",
    "ride a bike",
    "help in the kitchen",
]


@dataclass
class Who:
    """A story character with the pronouns that keep sentences agreeing."""

    name: str
    desc: str  # e.g. "a little girl named Lily"
    he: str
    him: str
    his: str


def cap(text: str) -> str:
    """Upper-case the first letter only (``str.capitalize`` would lower the rest)."""
    return text[:1].upper() + text[1:]


def a(noun: str) -> str:
    """Prefix the right indefinite article."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def make_who(rng: random.Random, exclude: str = "") -> Who:
    """Draw a child (mostly) or a pet animal as a character."""
    if rng.random() < 0.75:
        girl = rng.random() < 0.5
        name = rng.choice([n for n in (GIRLS if girl else BOYS) if n != exclude])
        kind = "girl" if girl else "boy"
        desc = f"{a(rng.choice(KID_ADJS))} {kind} named {name}"
    else:
        girl = rng.random() < 0.5
        name = rng.choice([n for n in (PET_GIRLS if girl else PET_BOYS) if n != exclude])
        desc = f"{a(rng.choice(KID_ADJS))} {rng.choice(ANIMALS)} named {name}"
    return Who(name, desc, *(("she", "her", "her") if girl else ("he", "him", "his")))


def say(who: str, text: str, rng: random.Random) -> str:
    """Wrap a line of dialogue in quotes with a matching speech verb."""
    end = text[-1]
    verb = {"?": "asked", "!": rng.choice(["said", "shouted"])}.get(end, "said")
    if rng.random() < 0.5:
        return f'{cap(who)} {verb}, "{text}"'
    quoted = text[:-1] + "," if end == "." else text
    return f'"{quoted}" {who} {verb}.'


def opening(hero: Who, rng: random.Random) -> str:
    """Pick an opening; "Once upon a time" dominates, as in TinyStories."""
    r = rng.random()
    if r < 0.7:
        return f"Once upon a time, there was {hero.desc}."
    if r < 0.8:
        return f"Once upon a time, in a small town, there lived {hero.desc}."
    if r < 0.9:
        return f"One day, {hero.desc} woke up early."
    return f"There once was {hero.desc}."


def intro(hero: Who, rng: random.Random) -> list[str]:
    """Opening line plus one or two facts about the hero."""
    facts = [
        f"{cap(hero.he)} liked to {rng.choice(HOBBIES)}.",
        f"{cap(hero.he)} had many friends and liked to laugh.",
        f"{cap(hero.his)} favorite color was {rng.choice(COLORS)}.",
        f"{cap(hero.he)} lived in a small house with {hero.his} mom and dad.",
        f"{hero.name} was always {rng.choice(['happy', 'kind', 'curious', 'busy'])}.",
    ]
    return [opening(hero, rng), *rng.sample(facts, rng.randint(1, 2))]


def ending(hero: Who, friend: Who, rng: random.Random) -> str:
    """Close the story on a happy note."""
    return rng.choice(
        [
            f"From that day on, {hero.name} and {friend.name} were best friends.",
            f"{hero.name} smiled. It was the best day ever.",
            f"That night, {hero.name} went to bed with a big smile.",
            f"{hero.name} and {friend.name} played together until the sun went down.",
            f"{hero.name} felt very happy inside.",
            "And they all lived happily ever after.",
        ]
    )


def plot_lost(h: Who, f: Who, rng: random.Random) -> list[str]:
    """Hero loses a toy, a friend helps find it."""
    place, color, toy = rng.choice(list(PLACES)), rng.choice(COLORS), rng.choice(TOYS)
    spot, other = rng.sample(HIDING, 2)
    return [
        f"One day, {h.name} went to the {place} with {h.his} {color} {toy}.",
        f"{cap(h.he)} wanted to {rng.choice(PLACES[place])}.",
        f"{cap(h.he)} played for a long time. But then {h.he} could not find {h.his} {toy}!",
        f"{h.name} was very {rng.choice(['sad', 'upset', 'worried'])}.",
        say(h.name, f"Where is my {toy}?", rng),
        f"Just then, {f.desc} came by.",
        say(
            f.name,
            rng.choice(["Don't be sad. I will help you look.", "I can help you find it."]),
            rng,
        ),
        f"They looked {other}, but the {toy} was not there.",
        f"Then {f.name} looked {spot}. There was the {color} {toy}!",
        say(h.name, f"Thank you, {f.name}! You are a good friend.", rng),
        f"{h.name} gave {f.name} a big hug.",
        f"{h.name} learned that friends help each other.",
    ]


def plot_share(h: Who, f: Who, rng: random.Random) -> list[str]:
    """Hero has treats, meets a sad friend, and shares."""
    treat = rng.choice(TREATS)
    who = rng.choice(["mom", "dad", "grandma"])
    return [
        f"One day, {h.his} {who} gave {h.him} a bag of {treat}.",
        f"{h.name} was so happy. {cap(h.he)} wanted to eat them all.",
        f"Then {h.he} saw {f.desc} sitting alone. {f.name} looked sad.",
        say(h.name, f"Why are you sad, {f.name}?", rng),
        say(
            f.name,
            rng.choice(["I am hungry. I have nothing to eat.", "I forgot my snack at home."]),
            rng,
        ),
        f"{h.name} thought for a moment. Then {h.he} smiled.",
        say(h.name, f"You can have some of my {treat}!", rng),
        f"{f.name} was very happy. They sat under a tree and ate the {treat} together.",
        say(f.name, "Thank you! These are yummy.", rng),
        f"{h.name} learned that sharing makes everyone happy.",
    ]


def plot_help(h: Who, f: Who, rng: random.Random) -> list[str]:
    """Hero and friend help a small animal in trouble."""
    animal = rng.choice(["bird", "kitten", "duckling", "puppy", "bunny", "squirrel"])
    place = rng.choice(list(PLACES))
    trouble, fix = rng.choice(
        [
            (
                "was stuck up in a tall tree",
                (f"{h.name} ran to get {h.his} dad. Dad got a ladder and carried the {animal} down."),
            ),
            (
                "had a hurt leg",
                (f"{h.name} and {f.name} made a soft bed for it in a box. They gave it some water and kept it warm."),
            ),
            (
                "was lost and could not find its mom",
                (f"They looked all around the {place}. At last, they found its mom, and the {animal} ran to her."),
            ),
            (
                "was cold and wet from the rain",
                (f"{h.name} wrapped it in {h.his} warm scarf. Soon the {animal} was dry and warm."),
            ),
        ]
    )
    return [
        f"One day, {h.name} and {h.his} friend {f.name} were walking home.",
        "Suddenly, they heard a small sound.",
        f"They looked around and saw a little {animal}. The {animal} {trouble}.",
        say(f.name, f"Poor little {animal}! What can we do?", rng),
        say(h.name, "We have to help it.", rng),
        fix,
        f"The {animal} was safe. It looked at {h.name} and {f.name} as if to say thank you.",
        f"{h.name} felt proud. Helping others felt good.",
    ]


def plot_trip(h: Who, f: Who, rng: random.Random) -> list[str]:
    """A day out with a grown-up; a small surprise; home tired and happy."""
    place, adult = rng.choice(list(PLACES)), rng.choice(["mom", "dad", "grandma", "grandpa"])
    first, second = rng.sample(PLACES[place], 2)
    twist = rng.choice(
        [
            [
                "Then, it started to rain!",
                "They ran under a big tree and waited.",
                "Soon the sun came out again, and they saw a big rainbow in the sky.",
            ],
            [
                f"Then, a big {rng.choice(['dog', 'goose', 'goat'])} came running toward them!",
                f"{f.name} was scared, but {h.name} held {f.him} by the hand.",
                "The animal only wanted to play. They all laughed.",
            ],
            [
                "Then, they found a pretty shell with many colors.",
                say(h.name, "Look! It is so shiny!", rng),
                f"{h.name} gave the shell to {f.name}.",
            ],
        ]
    )
    return [
        say(h.name, f"{cap(adult)}, can we go to the {place} today?", rng),
        say(f"{h.his} {adult}", "Yes, we can. Let's go!", rng),
        f"{h.name} was so excited. {cap(h.he)} asked {h.his} friend {f.name} to come too.",
        f"At the {place}, {h.name} and {f.name} wanted to {first}. Then they wanted to {second}.",
        *twist,
        f"When it was time to go home, {h.name} was tired but happy.",
        say(h.name, f"Thank you for a fun day, {cap(adult)}!", rng),
    ]


def plot_fear(h: Who, f: Who, rng: random.Random) -> list[str]:
    """Hero is afraid of something; a friend gives courage."""
    thing, act = rng.choice(
        [
            ("the big slide", "go down the big slide"),
            ("the deep water", "swim in the lake"),
            ("the tall tree", "climb the tall tree"),
            ("the dark cave", "look inside the dark cave"),
        ]
    )
    return [
        f"{h.name} was afraid of {thing}. {cap(h.he)} never wanted to {act}.",
        f"One day, {h.name} and {f.name} went out to play.",
        say(f.name, f"Come on, {h.name}! Let's {act}!", rng),
        say(h.name, "No, I am too scared.", rng),
        f"{f.name} took {h.his} hand.",
        say(f.name, "Don't be afraid. I will be right here with you.", rng),
        f"{h.name} took a deep breath. Then {h.he} was brave and tried.",
        "It was not scary at all. It was fun!",
        say(h.name, f"I did it! Thank you, {f.name}!", rng),
        f"{h.name} learned that being brave is easier with a friend.",
    ]


def plot_new_friend(h: Who, f: Who, rng: random.Random) -> list[str]:
    """Hero meets a shy newcomer and makes a friend."""
    place = rng.choice(list(PLACES))
    return [
        f"One day, {h.name} went to the {place}.",
        f"{cap(h.he)} saw {f.desc} standing all alone. {f.name} was new in town.",
        f"{h.name} felt a little shy, but {h.he} walked over and said hello.",
        say(h.name, f"Hi, I am {h.name}. Do you want to play with me?", rng),
        say(f.name, "Yes, I would like that very much!", rng),
        f"They wanted to {rng.choice(PLACES[place])}. Then they played tag and laughed a lot.",
        f"When the sun went down, {f.name} had to go home.",
        say(f.name, "Can we play again tomorrow?", rng),
        say(h.name, "Yes! See you tomorrow!", rng),
    ]


def plot_rain(h: Who, f: Who, rng: random.Random) -> list[str]:
    """A rainy day turns into fun indoors."""
    return [
        f"One morning, {h.name} wanted to go outside and {rng.choice(OUTSIDE)}.",
        f"But when {h.he} looked out the window, it was raining.",
        say(h.name, "Oh no! Now I can't play outside.", rng),
        f"{cap(h.his)} mom had an idea. She called {h.his} friend {f.name} to come over.",
        f"{h.name} and {f.name} built a big fort with blankets and pillows.",
        f"Inside the fort, they {rng.choice(INDOORS)}.",
        say(f.name, "This is the best fort ever!", rng),
        "After a while, the rain stopped. The sun came out, and there was a big rainbow.",
        f"{h.name} learned that a rainy day can be fun too.",
    ]


def plot_gift(h: Who, f: Who, rng: random.Random) -> list[str]:
    """Hero makes a birthday gift for family with a friend's help."""
    person = rng.choice(["mom", "dad", "grandma", "grandpa"])
    gift, verb = rng.choice(
        [
            (f"a card with a big {rng.choice(COLORS)} heart", "made"),
            ("a picture of the whole family", "drew"),
            ("a pretty bunch of flowers", "picked"),
            ("a little cake with sprinkles", "baked"),
        ]
    )
    return [
        f"Tomorrow was {h.his} {person}'s birthday.",
        f"{h.name} wanted to give {cap(person)} a special gift.",
        f"{cap(h.he)} asked {h.his} friend {f.name} for help.",
        say(f.name, "Let's make something together!", rng),
        f"They {verb} {gift}. It took a long time, but they did not give up.",
        f"The next day, {h.name} gave the gift to {cap(person)}.",
        say(cap(person), "Thank you! This is the best gift ever.", rng),
        f"{cap(person)} gave {h.name} a big hug. {h.name} felt warm and happy.",
    ]


def plot_sorry(h: Who, f: Who, rng: random.Random) -> list[str]:
    """Hero breaks a friend's toy, says sorry, and they fix it."""
    color, toy = rng.choice(COLORS), rng.choice(["toy car", "kite", "toy boat", "drum", "doll"])
    return [
        f"One day, {h.name} went to play at {f.name}'s house.",
        f"{f.name} had a new {color} {toy}. {h.name} wanted to play with it.",
        f"{h.name} played too hard, and the {toy} broke!",
        f"{f.name} started to cry. {h.name} felt very bad.",
        say(h.name, f"I'm sorry, {f.name}. I didn't mean to break it.", rng),
        f"{f.name} wiped {f.his} tears and said it was okay.",
        f"Then {h.name}'s dad came with some glue. Together, they fixed the {toy}.",
        say(f.name, "It looks as good as new!", rng),
        f"{h.name} learned to be careful with other people's toys.",
    ]


PLOTS: list[Callable[[Who, Who, random.Random], list[str]]] = [
    plot_lost,
    plot_share,
    plot_help,
    plot_trip,
    plot_fear,
    plot_new_friend,
    plot_rain,
    plot_gift,
    plot_sorry,
]


def make_story(rng: random.Random) -> str:
    """One story: intro, a plot, a happy ending, split into short paragraphs."""
    hero = make_who(rng)
    friend = make_who(rng, exclude=hero.name)
    body = rng.choice(PLOTS)(hero, friend, rng)
    cut = rng.randint(len(body) // 3, 2 * len(body) // 3)
    paragraphs = [intro(hero, rng), body[:cut], [*body[cut:], ending(hero, friend, rng)]]
    return "\n\n".join(" ".join(p) for p in paragraphs)


def make_corpus(n_bytes: int, seed: int) -> list[str]:
    """Generate stories until the corpus reaches about ``n_bytes`` of text."""
    rng, stories, size = random.Random(seed), [], 0
    while size < n_bytes:
        stories.append(make_story(rng))
        size += len(stories[-1]) + 1
    return stories


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def train_tokenizer(stories: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (exact round trips, no unknown tokens) that prepends ``<s>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stories, trainer=trainer)
    # transformers 5 keeps the add-BOS rule in tokenizer.json's post-processor
    # (it drops ``add_bos_token`` from tokenizer_config.json), so set it here.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def pack_tokens(tokenizer: PreTrainedTokenizerFast, stories: list[str], seq_len: int) -> torch.Tensor:
    """Encode ``<s> story </s>`` back to back; cut one ``seq_len`` block per story start.

    Every block begins at a story's ``<s>`` (and runs on into the next story),
    so each story fragment the model trains on includes its opening lines: the
    names it must repeat are in context to be copied rather than guessed. Too
    little text for one block gives none (an empty ``[0, seq_len]`` tensor).
    """
    ids: list[int] = []
    starts: list[int] = []
    for enc in tokenizer(stories)["input_ids"]:
        starts.append(len(ids))
        ids.extend([*enc, tokenizer.eos_token_id])
    flat = torch.tensor(ids, dtype=torch.long)
    blocks = [flat[s : s + seq_len] for s in starts if s + seq_len <= len(ids)]
    return torch.stack(blocks) if blocks else torch.empty(0, seq_len, dtype=torch.long)


# --------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------


def make_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """The fixed default architecture: ~1.6M parameters, GQA, tied embeddings."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).float()


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains stay undecayed)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    keep = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    """What the README and the final report need to know about the run."""

    steps: int
    planned: int
    train_loss: float
    val_loss: float
    seconds: float


def plan_steps(step_seconds: float, deadline: float, done: int) -> int:
    """Turn the measured step time into a step count that fits the budget.

    10% is kept in hand because the machine is shared and may slow down later.
    """
    return done + max(1, int(0.9 * (deadline - time.monotonic()) / step_seconds))


def train_step(model: LlamaForCausalLM, opt: torch.optim.Optimizer, batch: torch.Tensor, lr: float) -> float:
    """One AdamW update with gradient clipping; returns the batch loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train(model: LlamaForCausalLM, blocks: torch.Tensor, args: argparse.Namespace, deadline: float) -> TrainResult:
    """Train for ``args.steps`` or, when 0, for as many steps as fit before ``deadline``."""
    n_val = max(1, len(blocks) // 100)  # blocks overlap, so skip one between the splits
    val, data = blocks[:n_val], blocks[n_val + 1 :]
    gen = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(data), generator=gen), 0
    opt = make_optimizer(model, args.lr)
    total, step, window, start = args.steps or 10**9, 0, [], time.monotonic()
    model.train()
    while step < total:
        if pos + args.batch > len(order):  # next epoch, new order
            order, pos = torch.randperm(len(data), generator=gen), 0
        batch, pos = data[order[pos : pos + args.batch]], pos + args.batch
        lr = lr_at(step, total, args.lr, args.warmup)
        window.append(train_step(model, opt, batch, lr))
        step += 1
        if step == 50 and not args.steps:  # measured speed decides the schedule length
            total = plan_steps((time.monotonic() - start) / step, deadline, step)
            print(f"planned {total} steps to fit the time budget", flush=True)
        if step % args.log_every == 0 or step == total:
            rate = step * blocks.shape[1] * args.batch / (time.monotonic() - start)
            loss, window = sum(window) / len(window), []
            print(f"step {step:5d}/{total} loss {loss:.4f} lr {lr:.2e} {rate:,.0f} tok/s", flush=True)
        if step == args.stop_after:  # replays a run that the budget cut short
            break
        if not args.steps and time.monotonic() > deadline + 60:
            print(f"machine slowed down: stopping early at step {step}", flush=True)
            break
    loss = sum(window) / len(window) if window else loss
    val_loss = evaluate(model, val, args.batch)
    return TrainResult(step, total, loss, val_loss, time.monotonic() - start)


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, val: torch.Tensor, batch: int) -> float:
    """Mean loss on held-out blocks (stories the optimiser never saw), a check on overfitting."""
    model.eval()
    losses = [
        model(input_ids=val[i : i + batch], labels=val[i : i + batch]).loss.item() for i in range(0, len(val), batch)
    ]
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------
# Saving and showing
# --------------------------------------------------------------------------

README = """# tiny-stories

A tiny Llama-architecture causal language model that swarm ships as its
default checkpoint, so tests and demos run offline with a real Hugging Face
model that writes readable (if simple) English.

- Architecture: `LlamaForCausalLM`, {params:,} parameters, float32,
  hidden size 128, 8 layers, 4 attention heads, 2 key/value heads
  (grouped-query attention), intermediate size 352, tied embeddings,
  context length 512.
- Tokenizer: byte-level BPE, {vocab} tokens; `<pad>`={pad}, `<s>`={bos},
  `</s>`={eos}. Encoding prepends `<s>`; stories end with `</s>`.
- Data: {stories:,} synthetic children's stories ({mbytes:.1f} MB) generated by
  a hand-written grammar (no external data). Every story is made up.
- Training: {steps} AdamW steps of {batch} x {seq_len} tokens on one CPU core
  ({minutes:.1f} min); final train loss {train_loss:.3f}, held-out loss {val_loss:.3f}.

It only knows the small world of its generated stories; it is a test fixture,
not a useful language model.

Rebuild it exactly (same seed and step schedule; a plain `--minutes` budget
instead picks the step count from the machine's speed):

    {command}

Example (greedy) continuation of "{prompt}":

> {sample}
"""


def save(out: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, readme: str) -> None:
    """Write the Hugging Face folder: safetensors weights, tokenizer, configs, README."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(readme, encoding="utf-8")


@torch.no_grad()
def continuations(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int, n_sampled: int = 2
) -> list[str]:
    """One greedy and ``n_sampled`` sampled continuations of the prompt."""
    model.eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    torch.manual_seed(seed)
    outs = [model.generate(**inputs, max_new_tokens=200, do_sample=False)[0]]
    for _ in range(n_sampled):
        outs.append(model.generate(**inputs, max_new_tokens=200, do_sample=True, temperature=0.8, top_k=40)[0])
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def rebuild_command(args: argparse.Namespace, result: TrainResult) -> str:
    """The command line that repeats this run step for step."""
    steps = f"--steps {result.planned}"
    if result.steps < result.planned:  # the time budget ended the schedule early
        steps += f" --stop-after {result.steps}"
    return (
        f"python scripts/build_default_model.py --out {args.out} --seed {args.seed} "
        f"{steps} --corpus-mb {args.corpus_mb:g} --vocab-size {args.vocab_size} "
        f"--seq-len {args.seq_len} --batch {args.batch} --lr {args.lr:g} --warmup {args.warmup}"
    )


def parse_args() -> argparse.Namespace:
    """Command line; the shipped folder's README.md records the exact call that built it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("swarm/default_model/tiny-stories"))
    p.add_argument("--minutes", type=float, default=12.0, help="budget for the whole script")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="exact step count (0: fit --minutes)")
    p.add_argument("--stop-after", type=int, default=0, help="end early, keeping the schedule")
    p.add_argument("--corpus-mb", type=float, default=6.0)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args()


def render_readme(
    args: argparse.Namespace,
    result: TrainResult,
    tokenizer: PreTrainedTokenizerFast,
    stories: list[str],
    params: int,
    sample: str,
) -> str:
    """Fill the model card with the facts of this run."""
    return README.format(
        params=params,
        vocab=len(tokenizer),
        pad=tokenizer.pad_token_id,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        stories=len(stories),
        mbytes=sum(map(len, stories)) / 1e6,
        steps=result.steps,
        batch=args.batch,
        seq_len=args.seq_len,
        minutes=result.seconds / 60,
        train_loss=result.train_loss,
        val_loss=result.val_loss,
        prompt=PROMPT,
        command=rebuild_command(args, result),
        sample=sample.strip().replace("\n\n", "\n>\n> "),
    )


def main() -> None:
    """Corpus -> tokenizer -> model -> saved folder -> sample continuations."""
    args = parse_args()
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60 - 20  # leave time for eval, saving and samples
    torch.set_num_threads(1)  # one core, leaving the other free
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    stories = make_corpus(int(args.corpus_mb * 1e6), args.seed)
    tokenizer = train_tokenizer(stories, args.vocab_size)
    blocks = pack_tokens(tokenizer, stories, args.seq_len)
    print(f"{len(stories):,} stories, vocab {len(tokenizer)}, {len(blocks):,} blocks")
    print(stories[0], "\n", flush=True)
    model = make_model(tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params:,} parameters", flush=True)
    result = train(model, blocks, args, deadline)
    samples = continuations(model, tokenizer, args.seed)
    save(
        args.out,
        model,
        tokenizer,
        render_readme(args, result, tokenizer, stories, params, samples[0]),
    )
    summary = {
        "steps": result.steps,
        "train_loss": round(result.train_loss, 4),
        "val_loss": round(result.val_loss, 4),
        "wall_minutes": round((time.monotonic() - t0) / 60, 2),
    }
    print(json.dumps(summary))
    for kind, text in zip(["greedy", "sampled", "sampled"], samples, strict=True):
        print(f"\n--- {kind} ---\n{text}")


if __name__ == "__main__":
    main()
