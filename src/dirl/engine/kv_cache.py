"""The engine's KV cache: preallocated K/V slots written in place, one row per live sequence.

Slot index = absolute position. A row's slots below its current block hold the
clean K/V of its prompt and finished blocks; the current block's slots hold the
noisy K/V of the block being denoised (rewritten every forward, and overwritten
with the clean K/V when the block's commit rides along in the next forward).
The last slot is scratch: padding tokens of a ragged forward write there and no
query ever attends to it.

Each forward writes its tokens' K/V into their slots and attends over a view of
the slots in use, so no forward copies the past (the old layout concatenated
the whole cache to the new keys in every layer). Because every slot below a
query's limit is valid, the attention mask is a prefix per query
(``slot < limit``), built once per forward -- no per-slot metadata.

Memory follows the live rows (issue 19, design "compact when rows finish"):
:meth:`select` drops finished rows, :meth:`add_rows` appends joining ones and
:meth:`reserve` grows the slot axis in chunks as the longest row needs it, each one
layer at a time, so the transient overhead is one layer's worth and the resident
size is the live rows' slots (``peak_bytes`` records it). A joining row mostly takes
a finished row's place instead, with no copy: every slot below a query's limit is
written (prefill, then blocks) before that query reads it.
The model never owns this object; the engine passes a :class:`CacheStep` into
each forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROW_CHUNK = 512  # slots added per growth (a growth copies the cache once; 8k tokens -> 16 growths)


@dataclass(frozen=True)
class CacheLayout:
    """What the model fixes about a cache (layers, K/V heads and their size, dtype, device);
    the rows and slots are :class:`KVCache`'s own, per generate call."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


class KVCache:
    def __init__(self, layout: CacheLayout, num_rows: int, max_slots: int):
        self.max_slots = max_slots  # the most positions any row can reach (prompt + generation + block)
        self.capacity = 0           # usable slots per row; slot ``capacity`` is the scratch slot
        self._shape = (num_rows, layout.num_kv_heads, layout.head_dim)
        self._factory = dict(dtype=layout.dtype, device=layout.device)
        self.keys: list[torch.Tensor] = [torch.empty(0, **self._factory)] * layout.num_layers  # (R, Hkv, C + 1, D)
        self.values: list[torch.Tensor] = [torch.empty(0, **self._factory)] * layout.num_layers
        # Set by a compiled engine: every new layer tensor gets its rows and slots marked as
        # sizes that change (:meth:`CacheStep.mark_dynamic`). Off, torch._dynamo is never
        # imported (~70 MB of RSS) by an eager engine.
        self.for_compile = False
        self.peak_bytes = 0  # the most bytes its layers held at once, a reshape's transient layer included

    @classmethod
    def for_model(cls, model, num_rows: int, max_slots: int) -> "KVCache":
        arch = model.arch
        param = next(model.parameters())
        layout = CacheLayout(arch.num_layers, arch.num_kv_heads, arch.head_dim, param.dtype, param.device)
        return cls(layout, num_rows, max_slots)

    @property
    def scratch(self) -> int:
        return self.capacity

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reserve(self, end: int) -> None:
        """Make slots ``[0, end)`` usable, growing by :data:`GROW_CHUNK` (capped at ``max_slots``)."""
        if end <= self.capacity:
            return
        if end > self.max_slots:
            raise ValueError(f"KV cache: position {end} is past the reserved maximum {self.max_slots}")
        new_capacity = min(self.max_slots, max(end, self.capacity + GROW_CHUNK))
        rows, heads, dim = self._shape
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):  # one layer at a time: the overhead is one layer
                new = torch.zeros(rows, heads, new_capacity + 1, dim, **self._factory)
                if self.capacity:
                    new[:, :, : self.capacity] = old[:, :, : self.capacity]
                cache[i] = self._made(new)
                self._note_peak(old)
        self.capacity = new_capacity

    def _note_peak(self, old: torch.Tensor) -> None:
        """While one layer is replaced, its old tensor is still alive beside the new one."""
        self.peak_bytes = max(self.peak_bytes, self.num_bytes() + old.numel() * old.element_size())

    def _made(self, layer: torch.Tensor) -> torch.Tensor:
        """A new (R, Hkv, C + 1, D) layer tensor, marked once here rather than on every step."""
        if self.for_compile:
            torch._dynamo.maybe_mark_dynamic(layer, 0)
            torch._dynamo.maybe_mark_dynamic(layer, 2)
        return layer

    def add_rows(self, count: int) -> None:
        """Append ``count`` rows (joining sequences); their slots are written before they are read."""
        if count:
            self._reindex(lambda t: torch.cat([t, t.new_zeros(count, *t.shape[1:])]))
            self._shape = (self._shape[0] + count, *self._shape[1:])

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (finished sequences leave, and their memory with them)."""
        self._reindex(lambda t: t.index_select(0, rows))
        self._shape = (len(rows), *self._shape[1:])

    def repeat_interleave(self, n: int) -> None:
        """Give each row n copies (n samples per prompt share one prefill)."""
        if n > 1:
            self._reindex(lambda t: t.repeat_interleave(n, dim=0))
            self._shape = (self._shape[0] * n, *self._shape[1:])

    def _reindex(self, fn) -> None:
        if not self.capacity:
            return
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):
                cache[i] = self._made(fn(old))
                self._note_peak(old)
                del old

    def step(self, positions: torch.Tensor, valid: torch.Tensor | None, limit: torch.Tensor,
             always_mask: bool = False, rows: torch.Tensor | None = None) -> "CacheStep":
        """The cache as one forward sees it.

        positions: (R, T) of the input tokens (their slots); valid: (R, T) bool or None (all
        valid) -- padding writes to the scratch slot; limit: (R, T), the query of token t
        attends to slots ``[0, limit)`` (its row's clean prefix, plus its own block).
        always_mask: build the mask even when every query sees every slot (a compiled forward
        then sees one kind of step, and reads the number of slots in use from the mask's shape).
        rows: (R,) the cache rows of the forward's rows, when it runs a subset of them (time
        sharing: each layer's read then gathers those rows, a copy); None: all rows, in order.
        """
        end = int(limit.max())
        self.reserve(max(end, int(positions.max()) + 1))
        slots = positions if valid is None else torch.where(valid, positions, self.scratch)
        # Every query sees every slot in use (one row, no commit riding along): SDPA needs no mask.
        mask = None if int(limit.min()) == end and not always_mask else \
            (torch.arange(end, device=limit.device) < limit[..., None])[:, None]  # (R, 1, T, S)
        return CacheStep(self, slots, mask, end, rows)


class CacheStep:
    """Per forward: where each token's K/V goes, and the (R, 1, T, S) mask over slots ``[0, S)``.

    ``step[layer].update(k, v)`` is what the model's attention (:func:`dirl.model.blocks.attention_core`)
    calls: it writes this forward's K/V into their slots and returns the views
    to attend over. ``mask`` None means every query sees every slot in use.
    """

    def __init__(self, cache: KVCache, slots: torch.Tensor, mask: torch.Tensor | None, end: int,
                 rows: torch.Tensor | None = None):
        self.cache, self.mask, self._end, self.rows = cache, mask, end, rows
        heads = cache._shape[1]
        slots_per_row = cache.capacity + 1
        row_ids = torch.arange(cache._shape[0], device=slots.device) if rows is None else rows  # (R,)
        # Flat row index of every (row, kv head, token) in a (R * Hkv * (C + 1), D) view of a layer,
        # computed once for all layers: one index_copy_ per layer writes the whole step.
        base = (row_ids[:, None] * heads + torch.arange(heads, device=slots.device)) * slots_per_row  # (R, Hkv)
        self.flat_index = (base[:, :, None] + slots[:, None, :]).reshape(-1)  # (R * Hkv * T,)

    @property
    def end(self) -> int:
        """Slots in use, ``[0, end)``. Taken from the mask's shape when there is one: under
        ``torch.compile`` that is a symbolic size, where the int would be a guard (a recompile
        for every new length)."""
        return self._end if self.mask is None else self.mask.shape[-1]

    def mark_dynamic(self) -> None:
        """Tell ``torch.compile`` which sizes change between steps (rows, tokens, slots), so
        its first graph already covers them instead of recompiling once per new size (the
        cache's own tensors are marked when they are made)."""
        mark = torch._dynamo.maybe_mark_dynamic  # not an error where a size is 1 (compiled as a constant)
        mark(self.flat_index, 0)
        if self.mask is not None:  # (R, 1, T, S)
            mark(self.mask, 0), mark(self.mask, 2), mark(self.mask, 3)

    def __getitem__(self, layer: int) -> "_LayerSlots":
        return _LayerSlots(self, layer)


class _LayerSlots:
    def __init__(self, step: CacheStep, layer: int):
        self.step, self.layer = step, layer

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (R, Hkv, T, D) of this forward's tokens -> (R, Hkv, S, D) views of the slots in use."""
        step, cache = self.step, self.step.cache
        keys, values = cache.keys[self.layer], cache.values[self.layer]
        dim = keys.shape[-1]
        keys.view(-1, dim).index_copy_(0, step.flat_index, k.reshape(-1, dim))
        values.view(-1, dim).index_copy_(0, step.flat_index, v.reshape(-1, dim))
        if step.rows is not None:
            return keys[step.rows, :, : step.end], values[step.rows, :, : step.end]
        return keys[:, :, : step.end], values[:, :, : step.end]
