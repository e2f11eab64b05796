"""The engine's KV cache through its public interface: what is written is what a later forward
sees, rows can be dropped or repeated, and a cached forward equals the uncached one."""

from __future__ import annotations

import torch

from dirl.engine.kv_cache import KVCache
from dirl.model.masks import TokenMeta

B = 4  # block size of the tiny model


def _fake_kv(num_layers: int, rows: int, heads: int, tokens: int, dim: int, base: float):
    """Per layer (rows, heads, tokens, dim) K/V whose values encode (layer, row, token)."""
    out = []
    for layer in range(num_layers):
        k = torch.zeros(rows, heads, tokens, dim)
        for r in range(rows):
            for t in range(tokens):
                k[r, :, t] = base + 100 * layer + 10 * r + t
        out.append((k, -k))
    return out


def test_for_model_matches_the_model(tiny_model):
    cfg = tiny_model.config
    cache = KVCache.for_model(tiny_model, num_rows=3, capacity=16)
    assert cache.used() == 0 and cache.length.tolist() == [0, 0, 0]
    past = cache.past()
    assert len(past) == cfg.num_hidden_layers
    k, v = past[0]
    assert k.shape == (3, cfg.num_key_value_heads, 0, cfg.head_dim) and v.shape == k.shape
    assert k.dtype == next(tiny_model.parameters()).dtype
    assert cache.meta().doc.shape == (3, 0)


def test_write_then_past_returns_the_written_slots():
    cache = KVCache(num_layers=2, num_rows=2, num_kv_heads=1, capacity=12, head_dim=3, block_size=B,
                    dtype=torch.float32, device=torch.device("cpu"))
    new_kv = _fake_kv(2, 2, 1, 6, 3, base=1.0)
    # tokens 2..5 of the forward (one block) into slots 4..7 of both rows
    cache.write(new_kv, torch.tensor([0, 1]), slice(2, 6), torch.tensor([4, 4]))
    assert cache.length.tolist() == [8, 8] and cache.used() == 8
    for layer, (k, v) in enumerate(cache.past()):
        assert k.shape[2] == 8
        assert torch.equal(k[:, :, 4:8], new_kv[layer][0][:, :, 2:6])
        assert torch.equal(v[:, :, 4:8], new_kv[layer][1][:, :, 2:6])
        assert not k[:, :, :4].any()  # slots never written stay zero
    # a forward over row 1 only: src_rows maps its row 0 to cache row 1
    one = _fake_kv(2, 1, 1, 4, 3, base=1000.0)
    cache.write(one, torch.tensor([1]), slice(0, 4), torch.tensor([8]), src_rows=torch.tensor([0]))
    assert cache.length.tolist() == [8, 12]
    (k0, _), _ = cache.past()
    assert torch.equal(k0[1, :, 8:12], one[0][0][0]) and not k0[0, :, 8:12].any()
    # past(rows) copies just those rows
    (k_sel, _), _ = cache.past(torch.tensor([1]))
    assert k_sel.shape[0] == 1 and torch.equal(k_sel[0], k0[1])


def test_meta_is_clean_block_causal_with_unused_slots_as_padding():
    cache = KVCache(1, 2, 1, 16, 2, B, torch.float32, torch.device("cpu"))
    kv = _fake_kv(1, 2, 1, 8, 2, base=1.0)
    cache.write(kv, torch.tensor([0, 1]), slice(0, 8), torch.tensor([0, 0]))
    cache.write(kv, torch.tensor([1]), slice(0, 4), torch.tensor([8]))
    meta = cache.meta()  # (2, 12): row 0 holds 8 slots, row 1 holds 12
    pos = torch.arange(12).expand(2, 12)
    expected = TokenMeta.clean(pos, B, valid=pos < torch.tensor([[8], [12]]))
    assert all(torch.equal(a, b) for a, b in zip(meta.fields(), expected.fields()))
    assert (meta.doc[0, 8:] < 0).all() and (meta.doc[1] >= 0).all()
    assert not meta.noisy.any()
    assert torch.equal(meta.block[1], torch.arange(12) // B)
    only_second = cache.meta(torch.tensor([1]))
    assert all(torch.equal(a, b[1:]) for a, b in zip(only_second.fields(), expected.fields()))


def test_select_and_repeat_interleave_follow_the_rows():
    cache = KVCache(1, 3, 1, 8, 2, B, torch.float32, torch.device("cpu"))
    kv = _fake_kv(1, 3, 1, 4, 2, base=1.0)
    cache.write(kv, torch.tensor([0, 1, 2]), slice(0, 4), torch.tensor([0, 0, 0]))
    cache.write(kv, torch.tensor([2]), slice(0, 4), torch.tensor([4]), src_rows=torch.tensor([2]))
    before = cache.past()[0][0].clone()  # (3, 1, 8, 2)
    cache.select(torch.tensor([0, 2]))  # row 1 finished
    assert cache.length.tolist() == [4, 8]
    assert torch.equal(cache.past()[0][0], before[[0, 2]])
    cache.repeat_interleave(3)
    assert cache.length.tolist() == [4, 4, 4, 8, 8, 8]
    k = cache.past()[0][0]
    assert torch.equal(k, before[[0, 0, 0, 2, 2, 2]])
    cache.repeat_interleave(1)  # no-op
    assert cache.length.numel() == 6


def test_cached_forward_equals_uncached_forward(tiny_model):
    """Prefill two clean blocks into the cache, then the third block (noisy) with the cache
    equals the same block in one uncached forward over the whole sequence."""
    cfg = tiny_model.config
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, cfg.mask_token_id, 13, cfg.mask_token_id, 14]])
    pos = torch.arange(12)[None]
    prefix, block = slice(0, 8), slice(8, 12)
    clean = TokenMeta.clean(pos[:, prefix], B)
    noisy = TokenMeta.noisy_copy(pos[:, block], B, torch.zeros(1, B, dtype=torch.long))
    with torch.no_grad():
        full = tiny_model(ids, pos, clean.cat(noisy)).logits[0, 8:]  # (B, V)
        cache = KVCache.for_model(tiny_model, num_rows=1, capacity=16)
        out = tiny_model(ids[:, prefix], pos[:, prefix], clean,
                         logits_index=torch.empty(0, dtype=torch.long))
        cache.write(out.new_kv, torch.tensor([0]), slice(0, 8), torch.tensor([0]))
        cached = tiny_model(ids[:, block], pos[:, block], noisy, past_kv=cache.past(),
                            past_meta=cache.meta()).logits[0]
    assert cache.used() == 8
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
