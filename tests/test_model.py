"""The SDAR transformer: Qwen3 as an oracle, readout rows, the KV cache as an argument."""

from __future__ import annotations

import pytest
import torch

from dirl.engine.kv_cache import KVCache
from dirl.model.forward import Readout
from dirl.model.masks import TokenMeta

B = 4


def _perturb_norms(model, seed: int = 1) -> None:
    """Random RMSNorm weights, so a wrong norm placement cannot hide behind all-ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))


def _qwen3_from(model):
    """transformers' Qwen3ForCausalLM with our config and our state dict (strict)."""
    transformers = pytest.importorskip("transformers")
    cfg = model.config
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                  rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
                  tie_word_embeddings=False, attention_bias=False, use_sliding_window=False)
    try:  # transformers >= 5 groups RoPE settings
        hf_cfg = transformers.Qwen3Config(**kwargs, rope_parameters={"rope_type": "default",
                                                                      "rope_theta": cfg.rope_theta})
    except TypeError:
        hf_cfg = transformers.Qwen3Config(**kwargs, rope_theta=cfg.rope_theta)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Qwen3ForCausalLM(hf_cfg).float().eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


def test_block_size_one_equals_transformers_qwen3(make_tiny_model):
    model = make_tiny_model(block_size=1)
    _perturb_norms(model)
    hf = _qwen3_from(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(19).expand(2, 19)
    with torch.no_grad():
        ours = model(ids, pos, TokenMeta.clean(pos, 1)).logits
        theirs = hf(input_ids=ids, position_ids=pos).logits
    assert ours.shape == theirs.shape == (2, 19, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_logits_index_equals_slicing_full_logits(tiny_model):
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(10).expand(3, 10)
    meta = TokenMeta.clean(pos, B)
    index = torch.tensor([0, 7, 12, 29, 15])
    with torch.no_grad():
        full = tiny_model(ids, pos, meta).logits  # (3, 10, V)
        picked = tiny_model(ids, pos, meta, readout=Readout(index)).logits  # (5, V)
    assert picked.shape == (5, full.shape[-1])
    torch.testing.assert_close(picked, full.reshape(30, -1)[index], atol=1e-6, rtol=0)


@pytest.mark.parametrize("suffix_meta", ["clean", "noisy"])
def test_kv_cache_argument_equals_one_forward(tiny_model, suffix_meta):
    """[prefix] into the engine's in-place cache, then [suffix over the cache] = one forward of
    the whole sequence (the cache is an argument: a CacheStep per forward, never model state)."""
    gen = torch.Generator().manual_seed(2)
    prefix_len, suffix_len = 8, 4 if suffix_meta == "noisy" else 7
    total = prefix_len + suffix_len
    ids = torch.randint(0, 100, (2, total), generator=gen)
    pos = torch.arange(total).expand(2, -1)
    pre_pos, suf_pos = pos[:, :prefix_len], pos[:, prefix_len:]
    pre_meta = TokenMeta.clean(pre_pos, B)
    if suffix_meta == "clean":
        suf_meta = TokenMeta.clean(suf_pos, B)
    else:  # the decoding layout: one bidirectional noisy block on top of the cache
        suf_meta = TokenMeta.noisy_copy(suf_pos, B, torch.zeros_like(suf_pos))
    limit = ((pos // B + 1) * B).clamp_max(total)  # a query sees up to the end of its own block
    cache = KVCache.for_model(tiny_model, num_rows=2, max_slots=total)
    with torch.no_grad():
        whole = tiny_model(ids, pos, pre_meta.cat(suf_meta)).logits
        first = tiny_model(ids[:, :prefix_len], pre_pos, None,
                           cache=cache.step(pre_pos, None, limit[:, :prefix_len]))
        second = tiny_model(ids[:, prefix_len:], suf_pos, None,
                            cache=cache.step(suf_pos, None, limit[:, prefix_len:]))
    arch = tiny_model.arch
    assert len(cache.keys) == arch.num_layers
    assert cache.keys[0].shape == (2, arch.num_kv_heads, cache.capacity + 1, arch.head_dim)
    assert second.logits.shape == (2, suffix_len, arch.vocab_size)  # only this forward's tokens
    torch.testing.assert_close(first.logits, whole[:, :prefix_len], atol=1e-5, rtol=0)
    torch.testing.assert_close(second.logits, whole[:, prefix_len:], atol=1e-5, rtol=0)


def test_block_causal_and_bidirectional_within_block(tiny_model):
    """Changing a token changes logits in its own block and later ones, never earlier blocks."""
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(12)[None]
    meta = TokenMeta.clean(pos, B)
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 100  # block 1
    with torch.no_grad():
        a = tiny_model(ids, pos, meta).logits[0]
        b = tiny_model(changed, pos, meta).logits[0]
    diff = (a - b).abs().amax(-1)  # (12,)
    assert diff[:4].max() == 0  # block 0 cannot see block 1
    assert diff[4:6].min() > 0  # earlier tokens of the same block see it (bidirectional)
    assert diff[8:].min() > 0


def test_padding_does_not_change_real_tokens(tiny_model):
    """A row padded to a longer batch gives the same logits as alone."""
    gen = torch.Generator().manual_seed(4)
    short = torch.randint(0, 100, (1, 6), generator=gen)
    padded = torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1)
    pos = torch.arange(11)[None]
    with torch.no_grad():
        alone = tiny_model(short, pos[:, :6], TokenMeta.clean(pos[:, :6], B)).logits
        in_batch = tiny_model(padded, pos, TokenMeta.clean(pos, B, valid=pos < 6)).logits
    torch.testing.assert_close(in_batch[:, :6], alone, atol=1e-5, rtol=0)


def test_init_is_reproducible_and_seed_dependent(make_tiny_model):
    a, b, c = make_tiny_model(seed=0), make_tiny_model(seed=0), make_tiny_model(seed=1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.config.num_parameters() == sum(p.numel() for p in a.parameters())
