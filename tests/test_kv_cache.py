"""The engine's KV cache through its public interface: a step writes its K/V into its slots in
place and attends over a view of them, rows can be dropped or repeated, the slot axis grows in
chunks, and a cached forward equals the uncached one."""

from __future__ import annotations

import pytest
import torch

from dirl.engine.kv_cache import GROW_CHUNK, CacheLayout, KVCache
from dirl.model.forward import Readout
from dirl.model.masks import TokenMeta

B = 4  # block size of the tiny model


def _cache(rows: int = 2, max_slots: int = 64) -> KVCache:
    layout = CacheLayout(num_layers=2, num_kv_heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"))
    return KVCache(layout, num_rows=rows, max_slots=max_slots)


def test_cache_step_writes_slots_in_place_and_masks_a_prefix():
    cache = _cache()
    pos = torch.tensor([[4, 5, 6, 7], [0, 1, 2, 3]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    limit = torch.tensor([[8, 8, 8, 8], [4, 4, 4, 4]])
    step = cache.step(pos, valid, limit)
    k = torch.arange(2 * 2 * 4 * 3, dtype=torch.float32).view(2, 2, 4, 3)  # (R, Hkv, T, D)
    keys, values = step[1].update(k, -k)
    assert keys.shape == (2, 2, 8, 3) and step.end == 8
    # Views of the cache itself: nothing of the past is copied.
    assert keys.untyped_storage().data_ptr() == cache.keys[1].untyped_storage().data_ptr()
    torch.testing.assert_close(cache.keys[1][0, :, 4:8], k[0])
    torch.testing.assert_close(cache.values[1][1, :, 0:2], -k[1, :, :2])
    torch.testing.assert_close(cache.keys[1][1, :, 2:4], torch.zeros(2, 2, 3))  # padding went to scratch
    assert cache.keys[0].abs().sum() == 0  # other layers untouched
    expected = torch.arange(8)[None, None, :] < limit[:, :, None]
    assert torch.equal(step.mask[:, 0], expected)


def test_cache_step_without_ragged_rows_needs_no_mask():
    step = _cache(rows=1).step(torch.tensor([[0, 1, 2, 3]]), None, torch.tensor([[4, 4, 4, 4]]))
    assert step.mask is None


def test_always_mask_builds_the_all_visible_mask_and_reads_its_end_from_it():
    """What a compiled step gets: the same step with a mask of all True, and the slots in use
    taken from the mask's shape."""
    step = _cache(rows=1).step(torch.tensor([[4, 5, 6, 7]]), None, torch.tensor([[8, 8, 8, 8]]), always_mask=True)
    assert step.mask.shape == (1, 1, 4, 8) and bool(step.mask.all())
    assert step.end == 8


def test_cache_grows_in_chunks_and_follows_the_live_rows():
    cache = _cache(rows=3, max_slots=GROW_CHUNK + 100)
    cache.reserve(10)
    assert cache.capacity == GROW_CHUNK  # one chunk, not the whole generation up front
    cache.keys[0][:, :, :10] = torch.arange(3.0)[:, None, None, None]
    cache.reserve(GROW_CHUNK + 5)
    assert cache.capacity == GROW_CHUNK + 100  # capped at the most any row can reach
    full = cache.num_bytes()
    cache.select(torch.tensor([2, 0]))
    assert cache.num_bytes() == full * 2 // 3
    assert cache.keys[0][:, 0, 0, 0].tolist() == [2.0, 0.0]  # contents kept through growth and compaction
    with pytest.raises(ValueError, match="KV cache"):
        cache.reserve(GROW_CHUNK + 101)


def test_for_model_matches_the_model(tiny_model):
    cfg = tiny_model.config
    cache = KVCache.for_model(tiny_model, num_rows=3, max_slots=16)
    cache.reserve(8)
    assert len(cache.keys) == len(cache.values) == cfg.num_hidden_layers
    k = cache.keys[0]
    assert k.shape == (3, cfg.num_key_value_heads, cache.capacity + 1, cfg.head_dim)
    assert k.dtype == next(tiny_model.parameters()).dtype


def test_repeat_interleave_follows_the_rows():
    cache = _cache(rows=2)
    cache.reserve(4)
    cache.keys[0][:, :, 0] = torch.tensor([1.0, 2.0])[:, None, None]
    cache.repeat_interleave(3)
    assert cache.keys[0][:, 0, 0, 0].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    cache.repeat_interleave(1)  # no-op
    assert cache.keys[0].shape[0] == 6


def test_cached_forward_equals_uncached_forward(tiny_model):
    """Prefill two clean blocks into the cache, then the third block (noisy) over the cache
    equals the same block in one uncached forward over the whole sequence."""
    cfg = tiny_model.config
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, cfg.mask_token_id, 13, cfg.mask_token_id, 14]])
    pos = torch.arange(12)[None]
    prefix, block = slice(0, 8), slice(8, 12)
    clean = TokenMeta.clean(pos[:, prefix], B)
    noisy = TokenMeta.noisy_copy(pos[:, block], B, torch.zeros(1, B, dtype=torch.long))
    limit = (pos // B + 1) * B  # each query sees up to the end of its own block
    with torch.no_grad():
        full = tiny_model(ids, pos, clean.cat(noisy)).logits[0, 8:]  # (B, V)
        cache = KVCache.for_model(tiny_model, num_rows=1, max_slots=16)
        tiny_model(ids[:, prefix], pos[:, prefix], None, cache=cache.step(pos[:, prefix], None, limit[:, prefix]),
                   readout=Readout(torch.empty(0, dtype=torch.long)))
        cached = tiny_model(ids[:, block], pos[:, block], None,
                            cache=cache.step(pos[:, block], None, limit[:, block])).logits[0]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
