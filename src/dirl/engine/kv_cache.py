"""The engine's KV cache: clean keys/values of finished blocks, one row per sequence.

Slot index = absolute position, so a row's cache always holds whole blocks
(positions ``[0, length)``, a multiple of ``block_size``). The model never owns
this object; the engine passes ``past()`` and ``meta()`` into each forward and
writes the returned K/V back with :meth:`write`.
"""

from __future__ import annotations

import torch

from dirl.model.masks import TokenMeta


class KVCache:
    def __init__(self, num_layers: int, num_rows: int, num_kv_heads: int, capacity: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, device: torch.device):
        shape = (num_rows, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = torch.zeros(num_rows, dtype=torch.long, device=device)  # (R,)
        self.block_size = block_size

    @classmethod
    def for_model(cls, model, num_rows: int, capacity: int) -> "KVCache":
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.num_hidden_layers, num_rows, cfg.num_key_value_heads, capacity, cfg.head_dim,
                   cfg.block_size, param.dtype, param.device)

    def used(self) -> int:
        return int(self.length.max()) if self.length.numel() else 0

    def past(self, rows: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (R, Hkv, S, D) views over the slots in use (copies of ``rows`` only, if given)."""
        used = self.used()
        if rows is None:
            return [(k[:, :, :used], v[:, :, :used]) for k, v in zip(self.keys, self.values)]
        return [(k[:, :, :used].index_select(0, rows), v[:, :, :used].index_select(0, rows))
                for k, v in zip(self.keys, self.values)]

    def meta(self, rows: torch.Tensor | None = None) -> TokenMeta:
        """Mask metadata of the cached slots (clean, block-causal; unused slots are padding)."""
        used = self.used()
        length = self.length if rows is None else self.length.index_select(0, rows)
        pos = torch.arange(used, device=length.device).expand(len(length), used)  # (R, S)
        return TokenMeta.clean(pos, self.block_size, valid=pos < length[:, None])

    def write(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor,
              token_slice: slice, start: torch.Tensor, src_rows: torch.Tensor | None = None) -> None:
        """Store K/V of ``token_slice`` of the forward's tokens for ``rows`` at slots ``start[i] + j``.

        new_kv: per layer (R', Hkv, T, D); rows, start: (N,) long; ``src_rows`` (N,) are
        the matching rows of ``new_kv`` (default: ``rows``, when the forward covered the
        whole cache). Lengths grow to the written end.
        """
        if rows.numel() == 0:
            return
        src_rows = rows if src_rows is None else src_rows
        width = token_slice.stop - token_slice.start
        slots = start[:, None] + torch.arange(width, device=start.device)  # (N, W)
        for (k_new, v_new), k_cache, v_cache in zip(new_kv, self.keys, self.values):
            k_rows = k_new[src_rows, :, token_slice].transpose(1, 2)  # (N, W, Hkv, D)
            v_rows = v_new[src_rows, :, token_slice].transpose(1, 2)
            # Advanced indexing on dims 0 and 2 puts them first: target shape (N, W, Hkv, D).
            k_cache[rows[:, None], :, slots] = k_rows
            v_cache[rows[:, None], :, slots] = v_rows
        self.length[rows] = torch.maximum(self.length[rows], start + width)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (finished sequences leave the batch)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.length = self.length.index_select(0, rows)

    def repeat_interleave(self, n: int) -> None:
        """Give each row n copies (n samples per prompt share one prefill)."""
        if n == 1:
            return
        self.keys = [k.repeat_interleave(n, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(n, dim=0) for v in self.values]
        self.length = self.length.repeat_interleave(n)
