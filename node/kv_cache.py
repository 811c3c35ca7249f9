"""The node's KV cache: every session's keys and values in a few preallocated slabs, attended where they lie.

A slab holds rows of one capacity (tokens per row) for all the span's layers: keys and values
[layers, rows, kv_heads, capacity, head_dim], an additive attention bias per slot (0 for a real token, the
dtype's minimum for left padding and for every slot past the row's length) and, for ALiBi, each slot's
position. A session of batch b takes b adjacent rows of the slab whose capacity first fits its `max_length`.
Its tokens sit in slots 0..length-1 of its rows, so:

- a decode step's attention mask is the slot biases as they are (a view): nothing is built per step;
- a decode round over sessions of different lengths in one slab is one attention call over the rows they span
  (a view, no copy): each row's bias hides the slots past its own length; new keys go straight to their slots;
- a beam reorder is an index operation on the session's rows;
- rolling back to a position sets the length and hides the slots past it again.

Slabs grow by doubling their rows when a session needs more, and are released when their last session leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from swarm.models.attention import attend, blocked, full_mask, needs_full_mask, slot_bias
from swarm.models.spec import ModelSpec

MIN_CAPACITY = 32
MIN_STEP = 16


def capacity_for(max_length: int) -> int:
    """The row capacity a session of `max_length` tokens gets: rounded up to a quarter of its power of two (so
    at most a quarter of a row goes unused) and to at least `MIN_CAPACITY`, so that sessions of similar lengths
    share a slab and batch into one attention call."""
    if max_length <= MIN_CAPACITY:
        return MIN_CAPACITY
    step = max(MIN_STEP, 1 << (max_length.bit_length() - 3))
    return -(-max_length // step) * step


class Slab:
    """Rows of one capacity, for layers [start, end) of the span."""

    def __init__(self, spec: ModelSpec, layers: int, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.spec = spec
        self.capacity = capacity
        self.layers = layers
        self.device, self.dtype = device, dtype
        self.keys = self._empty(0)
        self.values = self._empty(0)
        self.bias = torch.empty(0, capacity, dtype=dtype, device=device)
        self.positions = torch.zeros(0, capacity, dtype=torch.int64, device=device) if spec.alibi else None
        self.used: list[bool] = []
        """Rows handed out; the tensors may lag behind until `materialize`."""

    def _empty(self, rows: int) -> torch.Tensor:
        spec = self.spec
        shape = (self.layers, rows, spec.num_kv_heads, self.capacity, spec.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def take(self, count: int) -> int:
        """The first of `count` adjacent free rows, adding rows (doubling) when there are none. Only the
        bookkeeping changes here; the tensors grow in `materialize`, on the compute thread, so that a round
        running meanwhile keeps writing where it reads."""
        run = 0
        for row, used in enumerate(self.used):
            run = 0 if used else run + 1
            if run == count:
                first = row - count + 1
                self.used[first : row + 1] = [True] * count
                return first
        first = len(self.used) - run  # a free run at the end extends into the new rows
        self.used.extend([False] * (max(first + count, 2 * len(self.used), 2) - len(self.used)))
        self.used[first : first + count] = [True] * count
        return first

    def give_back(self, first: int, count: int) -> None:
        self.used[first : first + count] = [False] * count

    @property
    def empty(self) -> bool:
        return not any(self.used)

    @torch.inference_mode()
    def materialize(self) -> None:
        """Grow the tensors to every row handed out (the old rows are copied once)."""
        old, rows = self.keys.shape[1], len(self.used)
        if rows <= old:
            return
        keys, values = self._empty(rows), self._empty(rows)
        keys[:, :old], values[:, :old] = self.keys, self.values
        self.keys, self.values = keys, values
        bias = torch.full((rows, self.capacity), blocked(self.dtype), dtype=self.dtype, device=self.device)
        bias[:old] = self.bias
        self.bias = bias
        if self.positions is not None:
            positions = torch.zeros(rows, self.capacity, dtype=torch.int64, device=self.device)
            positions[:old] = self.positions
            self.positions = positions

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass
class CacheRows:
    """One session's rows of a slab."""

    slab: Slab
    first: int
    count: int
    owner: KVCache
    fresh: bool = True
    """The rows may still hold a former session's biases: the first round that uses them hides every slot."""

    def release(self) -> None:
        """Give the rows back (the session closed)."""
        self.owner.release(self)

    @property
    def rows(self) -> slice:
        return slice(self.first, self.first + self.count)

    def prepare(self) -> None:
        """Before a round (on the compute thread): the slab's tensors exist, and fresh rows hide every slot."""
        self.slab.materialize()
        if self.fresh:
            self.slab.bias[self.rows] = blocked(self.slab.dtype)
            self.fresh = False

    @torch.inference_mode()
    def truncate(self, length: int) -> None:
        """Forget the slots from `length` on (a failed step is undone): hidden from attention again."""
        if not self.fresh:
            self.slab.bias[self.rows, length:] = blocked(self.slab.dtype)

    @torch.inference_mode()
    def reorder(self, order: torch.Tensor) -> None:
        """Beam search: row i of the session becomes its row `order[i]`, in every layer."""
        slab, rows = self.slab, self.rows
        slab.materialize()
        order = order.to(slab.device)
        slab.keys[:, rows] = slab.keys[:, rows].index_select(1, order)
        slab.values[:, rows] = slab.values[:, rows].index_select(1, order)
        slab.bias[rows] = slab.bias[rows].index_select(0, order)
        if slab.positions is not None:
            slab.positions[rows] = slab.positions[rows].index_select(0, order)

    @torch.inference_mode()
    def saved(self) -> tuple[torch.Tensor, ...]:
        """Copies of the session's rows, for undoing a reorder if the step it came with fails."""
        slab, rows = self.slab, self.rows
        slab.materialize()
        kept = (slab.keys[:, rows].clone(), slab.values[:, rows].clone(), slab.bias[rows].clone())
        return kept + ((slab.positions[rows].clone(),) if slab.positions is not None else ())

    @torch.inference_mode()
    def restore(self, saved: tuple[torch.Tensor, ...]) -> None:
        slab, rows = self.slab, self.rows
        slab.keys[:, rows], slab.values[:, rows], slab.bias[rows] = saved[:3]
        if slab.positions is not None:
            slab.positions[rows] = saved[3]


@dataclass
class KVCache:
    """The slabs of one span's sessions; `allocate` and `release` keep track of who holds which rows."""

    spec: ModelSpec
    start: int
    end: int
    device: torch.device
    dtype: torch.dtype
    slabs: dict[int, Slab] = field(default_factory=dict)

    def allocate(self, batch: int, max_length: int) -> CacheRows:
        capacity = capacity_for(max_length)
        slab = self.slabs.get(capacity)
        if slab is None:
            slab = self.slabs[capacity] = Slab(self.spec, self.end - self.start, capacity, self.device, self.dtype)
        return CacheRows(slab, slab.take(batch), batch, self)

    def release(self, rows: CacheRows) -> None:
        rows.slab.give_back(rows.first, rows.count)
        if rows.slab.empty and self.slabs.get(rows.slab.capacity) is rows.slab:
            del self.slabs[rows.slab.capacity]

    @property
    def nbytes(self) -> int:
        return sum(slab.nbytes for slab in self.slabs.values())


@dataclass
class RoundEntry:
    """One session's part of a round: its rows, how many tokens it holds, and its new tokens' masks."""

    rows: CacheRows
    length: int
    positions: torch.Tensor
    """[batch, new tokens] positions of the new tokens."""
    new_valid: torch.Tensor | None
    """[batch, new tokens] which of them are real tokens (not padding); None: all of them."""


class RoundAttention:
    """Attention for one forward over one or more sessions (a round): their rows are grouped by slab, each group
    attended in one call over the rows it spans. Masks are set up once per round; each layer writes its new
    keys and values into the sessions' slots and attends.

    Sessions in a round all add the same number of new tokens (the batcher batches single-token steps; a
    longer step runs alone)."""

    def __init__(self, cache: KVCache, entries: list[RoundEntry]) -> None:
        self.cache = cache
        by_slab: dict[int, list[tuple[int, RoundEntry]]] = {}
        offset = 0
        for entry in entries:
            by_slab.setdefault(id(entry.rows.slab), []).append((offset, entry))
            offset += entry.rows.count
        self.groups = [
            _OneSession.build(cache, members[0][1]) if len(members) == 1 else _Sessions.build(cache, members)
            for members in by_slab.values()
        ]
        self.batch_indexes = [] if len(self.groups) == 1 else [_batch_index(members) for members in by_slab.values()]

    @torch.compiler.disable  # `--compile` compiles the layers' math around it; the cache writes stay eager
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        layer -= self.cache.start
        if len(self.groups) == 1:
            return self.groups[0].attend(layer, q, k, v, scale)
        out = torch.empty_like(q)
        for group, index in zip(self.groups, self.batch_indexes, strict=True):
            out[index] = group.attend(layer, q[index], k[index], v[index], scale)
        return out


def _batch_index(members: list[tuple[int, RoundEntry]]) -> torch.Tensor:
    """The rows of the round's batch that belong to these sessions."""
    rows = [torch.arange(offset, offset + entry.rows.count) for offset, entry in members]
    return torch.cat(rows).to(members[0][1].rows.slab.device)


@dataclass
class _OneSession:
    """One session's rows (adjacent, all holding the same number of tokens): views of every layer's slots,
    made once per round, so a layer writes its new keys and attends with two copies and one call."""

    new_keys: torch.Tensor
    new_values: torch.Tensor
    """[layers, batch, kv_heads, new tokens, head_dim]: where the new keys and values go."""
    keys: torch.Tensor
    values: torch.Tensor
    """[layers, batch, kv_heads, slots attended, head_dim]"""
    mask: torch.Tensor

    @classmethod
    def build(cls, cache: KVCache, entry: RoundEntry) -> _OneSession:
        cache_rows = entry.rows
        cache_rows.prepare()
        slab, rows = cache_rows.slab, cache_rows.rows
        tokens = entry.positions.shape[1]
        first, span = entry.length, entry.length + tokens
        if entry.new_valid is None:
            slab.bias[rows, first:span] = 0
        else:
            slab.bias[rows, first:span] = slot_bias(entry.new_valid.to(slab.device), slab.dtype)
        if slab.positions is not None:
            slab.positions[rows, first:span] = entry.positions.to(slab.device)
        if needs_full_mask(cache.spec, tokens):
            slots = torch.arange(first, span, device=slab.device).expand(cache_rows.count, tokens)
            positions = slab.positions[rows, :span] if slab.positions is not None else None
            mask = full_mask(cache.spec, slab.bias[rows, :span], slots, positions)
        else:
            mask = slab.bias[rows, None, None, :span]
        keys, values = slab.keys[:, rows], slab.values[:, rows]
        return cls(
            keys[:, :, :, first:span], values[:, :, :, first:span], keys[:, :, :, :span], values[:, :, :, :span], mask
        )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        self.new_keys[layer] = k
        self.new_values[layer] = v
        return attend(q, self.keys[layer], self.values[layer], self.mask, scale)


@dataclass
class _Sessions:
    """Several sessions' single-token steps in one slab: index writes, one attention call over rows lo..hi."""

    slab: Slab
    lo: int
    hi: int
    row_index: torch.Tensor
    """Those rows' slab rows."""
    slots: torch.Tensor
    """The slot each row's new token goes to."""
    dense: bool
    """The group's rows are exactly slab rows lo..hi-1 in batch order: no scatter or gather needed."""
    mask: torch.Tensor
    span: int
    """Slots attended (the longest row's length after this round)."""

    @classmethod
    def build(cls, cache: KVCache, members: list[tuple[int, RoundEntry]]) -> _Sessions:
        spec = cache.spec
        slab = members[0][1].rows.slab
        device = slab.device
        slab_rows: list[int] = []
        slots: list[int] = []
        for _, entry in members:
            entry.rows.prepare()
            slab_rows.extend(range(entry.rows.first, entry.rows.first + entry.rows.count))
            slots.extend([entry.length] * entry.rows.count)
        row_index = torch.tensor(slab_rows, device=device)
        slot_index = torch.tensor(slots, device=device)
        lo, hi = min(slab_rows), max(slab_rows) + 1
        span = max(slots) + 1
        if all(entry.new_valid is None for _, entry in members):
            slab.bias[row_index, slot_index] = 0
        else:
            real = [_real(entry) for _, entry in members]
            slab.bias[row_index, slot_index] = slot_bias(torch.cat(real).to(device)[:, 0], slab.dtype)
        if slab.positions is not None:
            slab.positions[row_index, slot_index] = torch.cat([e.positions for _, e in members]).to(device)[:, 0]
        dense = slab_rows == list(range(lo, hi))
        if needs_full_mask(spec, 1):
            query_slots = torch.zeros(hi - lo, 1, dtype=torch.int64, device=device)
            query_slots[row_index - lo, 0] = slot_index
            positions = slab.positions[lo:hi, :span] if slab.positions is not None else None
            mask = full_mask(spec, slab.bias[lo:hi, :span], query_slots, positions)
        else:
            mask = slab.bias[lo:hi, None, None, :span]
        return cls(slab, lo, hi, row_index, slot_index, dense, mask, span)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        keys, values = self.slab.keys[layer], self.slab.values[layer]
        keys[self.row_index, :, self.slots] = k[:, :, 0]
        values[self.row_index, :, self.slots] = v[:, :, 0]
        keys, values = keys[self.lo : self.hi, :, : self.span], values[self.lo : self.hi, :, : self.span]
        if self.dense:
            return attend(q, keys, values, self.mask, scale)
        queries = q.new_zeros(self.hi - self.lo, *q.shape[1:])
        queries[self.row_index - self.lo] = q
        return attend(queries, keys, values, self.mask, scale)[self.row_index - self.lo]


def _real(entry: RoundEntry) -> torch.Tensor:
    if entry.new_valid is not None:
        return entry.new_valid
    return torch.ones(entry.rows.count, entry.positions.shape[1], dtype=torch.bool)
