"""Attention layouts: how an SFT sample, a decode step and a set of trace states become one
forward's (input_ids, position_ids, TokenMeta, readout rows), per attention scheme.

* :mod:`~dirl.model.layout.block_causal` -- SDAR-style block diffusion (``[x_t ; x_0]`` for
  SFT, clean cache + one noisy block for decoding, clean sequence + noisy block copies for
  traces).
* :mod:`~dirl.model.layout.bidirectional` -- full attention (LLaDA, Dream): a state is one noisy
  copy of the whole sequence, bidirectional inside; several states of a sequence are separate copies.

:func:`readout_rows` is the one place that maps "score the token at flat row j" to the
logits row to read, applying the family's ``logit_shift``.
"""

from __future__ import annotations

import importlib

import torch

LAYOUTS: dict[str, str] = {"block_causal": "dirl.model.layout.block_causal",
                           "bidirectional": "dirl.model.layout.bidirectional"}


def readout_rows(token_index: torch.Tensor, shift: int) -> torch.Tensor:
    """Flat rows (into B*T) whose logits predict the tokens at flat rows ``token_index``.

    shift 0: a token's logits are at its own row (SDAR, LLaDA); shift 1: at the row before
    it in the same sequence (Dream, AR-initialised). A scored token is never at position 0,
    so a shifted row never leaves its sequence."""
    return token_index - shift if shift else token_index


def get_layout(arch):
    """The layout object of ``arch.attention`` (its module's ``LAYOUT``)."""
    if arch.attention not in LAYOUTS:
        raise ValueError(f"no layout for attention {arch.attention!r} yet; have {sorted(LAYOUTS)}")
    return importlib.import_module(LAYOUTS[arch.attention]).LAYOUT
