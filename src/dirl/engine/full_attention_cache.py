"""Fast-dLLM's approximate K/V cache for full attention (Wu et al. 2025, "Fast-dLLM"), opt-in.

Under bidirectional attention no K/V is exact once anything in the sequence changes, so this
cache trades exactness for speed, for eval and serving (``cache: prefix | dual``; the default
``none`` recomputes everything). When a row starts a block, the step is a full forward that
*records* every layer's K/V over the whole sequence (that step is exact). The block's other
steps run only a window of tokens against the recorded slots:

* ``prefix`` -- the window is the current block and everything after it: the prefix's K/V stay
  as recorded at the block's start;
* ``dual``   -- the window is the current block only: prefix and suffix K/V stay as recorded.

The window's fresh K/V overwrite their slots. A shifted-logit model (Dream) widens the window by
one token on the left, the row its first block token is read from. RL with this cache scores
states the sampler did not see: its log-probs are not the trainer's (README).
"""

from __future__ import annotations

import torch


class _Slot:
    """Layer ``layer``'s view of the cache, what a layer's attention calls ``update`` on."""

    def __init__(self, cache: "WindowCache", layer: int):
        self.cache, self.layer = cache, layer

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """k, v: (R, Hkv, Q, D) of this forward's tokens -> every slot's (R, Hkv, W, D)."""
        c, i = self.cache, self.layer
        if c.slots is None:  # recording a full forward
            c.k[i], c.v[i] = k, v
            return k, v
        index = c.slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        c.k[i] = c.k[i].scatter(2, index, k)
        c.v[i] = c.v[i].scatter(2, index, v)
        return c.k[i], c.v[i]


class WindowCache:
    """Per-layer K/V of every slot of the rows, as of the last recording forward (module docstring)."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.slots: torch.Tensor | None = None  # (R, Q): the slots the window's tokens fill; None = record
        self.mask: torch.Tensor | None = None   # (R, 1, 1, W) key padding during a window step

    def __getitem__(self, layer: int) -> _Slot:
        return _Slot(self, layer)

    def record(self) -> "WindowCache":
        self.slots, self.mask = None, None
        return self

    def window(self, slots: torch.Tensor, valid: torch.Tensor) -> "WindowCache":
        self.slots, self.mask = slots, valid[:, None, None, :]
        return self

    def select(self, index: torch.Tensor) -> None:
        self.k = [None if t is None else t.index_select(0, index) for t in self.k]
        self.v = [None if t is None else t.index_select(0, index) for t in self.v]


def window_slots(mode: str, block_start: torch.Tensor, block_length: int, width: int, shift: int) -> torch.Tensor:
    """(R,) first slot of each row's block -> (R, Q) slots of the window (module docstring)."""
    if mode == "dual":
        start = block_start - shift
        return (start[:, None] + torch.arange(block_length + shift, device=start.device)).clamp_max(width - 1)
    start = int(block_start.min()) - shift
    return torch.arange(start, width, device=block_start.device).expand(len(block_start), -1)
