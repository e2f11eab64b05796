"""Attention masks (DESIGN §4) against loop-built references, and the two attention paths.

Every reference below is written from the English rules of DESIGN §4, token by
token in plain Python loops -- never by calling ``dirl.model.masks.visible`` --
and compared with ``dense_mask`` over the metadata the code builds.
"""

from __future__ import annotations

import pytest
import torch

from dirl.model.masks import TokenMeta, dense_mask, mask_mod_for, sft_meta
from dirl.model.trace import StepCopy, Trace, pack_traces, trace_copies

B = 4


def _expected_dense(ref: torch.Tensor) -> torch.Tensor:
    """``dense_mask`` lets a query that sees nothing (padding) see everything (SDPA NaN guard)."""
    return (ref | ~ref.any(-1, keepdim=True))[:, None]


# -- training [x_t ; x_0] -----------------------------------------------------------------------------


def _sft_reference(pos: list[int], doc: list[int], block_size: int) -> torch.Tensor:
    """(2L, 2L) mask for one row [x_t ; x_0] from the rules, by loops.

    Noisy query: its own noisy block + clean blocks strictly before it.
    Clean query: clean blocks up to and including its own; never noisy.
    Only inside one document; padding (doc -1) sees / is seen by nothing.
    """
    length = len(pos)
    tokens = [("noisy", pos[i], doc[i]) for i in range(length)] + [("clean", pos[i], doc[i]) for i in range(length)]
    ref = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for qi, (q_kind, q_pos, q_doc) in enumerate(tokens):
        for ki, (k_kind, k_pos, k_doc) in enumerate(tokens):
            if q_doc < 0 or k_doc != q_doc:
                continue
            qb, kb = q_pos // block_size, k_pos // block_size
            if q_kind == "noisy":
                ok = (k_kind == "noisy" and kb == qb) or (k_kind == "clean" and kb < qb)
            else:
                ok = k_kind == "clean" and kb <= qb
            ref[qi, ki] = ok
    return ref


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_sft_mask_single_document(block_size):
    pos = list(range(10))
    meta = sft_meta(torch.tensor([pos]), block_size)
    ref = _sft_reference(pos, [0] * 10, block_size)
    assert torch.equal(dense_mask(meta, meta)[0, 0], ref)


def test_sft_mask_packed_documents_and_padding():
    # Row 0: docs of length 6, 5 and 3 tokens of padding; row 1: one doc of 9 and 5 padding.
    pos0 = list(range(6)) + list(range(5)) + [0, 0, 0]
    doc0 = [0] * 6 + [1] * 5 + [-1] * 3
    pos1 = list(range(9)) + [0] * 5
    doc1 = [0] * 9 + [-1] * 5
    meta = sft_meta(torch.tensor([pos0, pos1]), B, torch.tensor([doc0, doc1]))
    got = dense_mask(meta, meta)
    for r, (pos, doc) in enumerate([(pos0, doc0), (pos1, doc1)]):
        ref = _sft_reference(pos, doc, B)
        assert torch.equal(got[r, 0], _expected_dense(ref[None])[0, 0]), f"row {r}"
        # Real tokens always see at least themselves; padding sees nothing (then all, by the guard).
        assert all(ref[i].any() == (doc[i % len(doc)] >= 0) for i in range(2 * len(doc)))


def test_sft_mask_same_block_index_in_two_documents_is_separate():
    # Two packed docs whose blocks have the same index must not see each other's noisy copy.
    pos = [0, 1, 2, 3, 0, 1, 2, 3]
    doc = [0, 0, 0, 0, 1, 1, 1, 1]
    meta = sft_meta(torch.tensor([pos]), B, torch.tensor([doc]))
    mask = dense_mask(meta, meta)[0, 0]
    assert not mask[:4, 4:8].any() and not mask[4:8, :4].any()
    assert torch.equal(mask, _sft_reference(pos, doc, B))


# -- decoding: KV cache + the current block ------------------------------------------------------------


def _decode_reference(cache_len: int, cache_valid: int, prev_valid: bool | None, block: int,
                      block_size: int) -> torch.Tensor:
    """Queries = [prev clean block (optional)] + current block; keys = cache slots + queries.

    The cached prefix is clean and block-causal; the current block sees every valid
    cached slot, the just-finished previous block (when it rides along) and itself
    bidirectionally. The previous block (clean) sees the cache and itself, not the
    noisy block. Invalid cache slots (beyond this row's length) are seen by nobody.
    """
    queries = []
    if prev_valid is not None:
        queries += [("clean", (block - 1) * block_size + j, prev_valid) for j in range(block_size)]
    queries += [("noisy", block * block_size + j, True) for j in range(block_size)]
    keys = [("clean", s, s < cache_valid) for s in range(cache_len)] + queries
    ref = torch.zeros(len(queries), len(keys), dtype=torch.bool)
    for qi, (q_kind, q_pos, q_ok) in enumerate(queries):
        for ki, (k_kind, k_pos, k_ok) in enumerate(keys):
            if not (q_ok and k_ok):
                continue
            qb, kb = q_pos // block_size, k_pos // block_size
            if q_kind == "noisy":
                ref[qi, ki] = (k_kind == "noisy" and kb == qb) or (k_kind == "clean" and kb < qb)
            else:
                ref[qi, ki] = k_kind == "clean" and kb <= qb
    return ref


@pytest.mark.parametrize("fused", [False, True])
def test_decode_mask_matches_reference(fused):
    # Two rows sharing a cache of 12 slots: row 0 uses all 12 (block 3 next), row 1 only 4.
    # With ``fused`` the just-finished block rides along as clean tokens in front (row 1 has none).
    cache_len, lengths, blocks = 12, [12, 4], [3, 1]
    if fused:
        lengths, blocks = [8, 4], [3, 1]
    cache_pos = torch.arange(cache_len).expand(2, cache_len)
    cache_meta = TokenMeta.clean(cache_pos, B, valid=cache_pos < torch.tensor(lengths)[:, None])
    block_pos = torch.tensor(blocks)[:, None] * B + torch.arange(B)
    q_meta = TokenMeta.noisy_copy(block_pos, B, torch.zeros_like(block_pos))
    prev_valid = [True, False]
    if fused:
        prev_pos = block_pos - B
        valid = torch.tensor(prev_valid)[:, None].expand(2, B)
        q_meta = TokenMeta.clean(prev_pos, B, valid).cat(q_meta)
    got = dense_mask(q_meta, cache_meta.cat(q_meta))
    for r in range(2):
        ref = _decode_reference(cache_len, lengths[r], prev_valid[r] if fused else None, blocks[r], B)
        assert torch.equal(got[r, 0], _expected_dense(ref[None])[0, 0]), f"row {r}"
        assert ref[-B:, -B:].all()  # the current block is bidirectional


# -- DiPO trace packing -------------------------------------------------------------------------------


def _trace_reference(num_clean: int, copy_blocks: list[int], width: int, block_size: int) -> torch.Tensor:
    """(W, W) mask of one packed row: clean tokens 0..n-1, then B tokens per copy, then padding.

    Clean tokens are block-causal; a copy of block b sees the clean blocks < b and
    itself (bidirectionally); nothing sees a copy but itself; padding sees nothing.
    """
    tokens = [("clean", p // block_size, -1) for p in range(num_clean)]
    for c, b in enumerate(copy_blocks):
        tokens += [("copy", b, c)] * block_size
    tokens += [("pad", -1, -1)] * (width - len(tokens))
    ref = torch.zeros(width, width, dtype=torch.bool)
    for qi, (q_kind, qb, qc) in enumerate(tokens):
        for ki, (k_kind, kb, kc) in enumerate(tokens):
            if q_kind == "clean":
                ref[qi, ki] = k_kind == "clean" and kb <= qb
            elif q_kind == "copy":
                ref[qi, ki] = (k_kind == "clean" and kb < qb) or (k_kind == "copy" and kc == qc)
    return ref


def _example_traces():
    """Two sequences: prompt 6 (not a multiple of B) and prompt 8 (a multiple)."""
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]]
    tokens = [[20, 21, 22, 23, 24, 25, 26, 27, 28, 29], [30, 31, 32, 33]]
    steps = [[0, 1, 1, 3, 2, 4, 4, 4, 6, 5], [1, 0, 2, 1]]
    return prompts, tokens, steps


def test_trace_copies_one_per_step_and_block():
    prompts, tokens, steps = _example_traces()
    copies = trace_copies(len(prompts[0]), steps[0], B)
    # Blocks: 1 holds gen 0-1 (steps 0, 1); 2 holds gen 2-5 (steps 1, 3, 2, 4); 3 holds gen 6-9 (4, 4, 6, 5).
    assert copies == [StepCopy(1, 0, 1), StepCopy(1, 1, 2), StepCopy(2, 1, 2), StepCopy(2, 2, 3), StepCopy(2, 3, 4),
                      StepCopy(2, 4, 5), StepCopy(3, 4, 5), StepCopy(3, 5, 6), StepCopy(3, 6, 7)]
    merged = trace_copies(len(prompts[0]), steps[0], B, merge=2)
    assert merged == [StepCopy(1, 0, 2), StepCopy(2, 1, 3), StepCopy(2, 3, 5), StepCopy(3, 4, 6), StepCopy(3, 6, 7)]


def test_trace_pack_mask_and_contents_match_reference(tokenizer):
    prompts, tokens, steps = _example_traces()
    copies = [trace_copies(len(p), s, B) for p, s in zip(prompts, steps)]
    mask_id, pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id
    pack = pack_traces(list(map(Trace, prompts, tokens, steps)), copies, B, mask_id, pad_id)
    width = pack.input_ids.shape[1]
    got = dense_mask(pack.meta, pack.meta)
    scored = set()
    for r in range(2):
        n = len(prompts[r]) + len(tokens[r])
        ref = _trace_reference(n, [c.block for c in copies[r]], width, B)
        assert torch.equal(got[r, 0], _expected_dense(ref[None])[0, 0]), f"row {r}"
        clean = prompts[r] + tokens[r]
        assert pack.input_ids[r, :n].tolist() == clean
        for c, cp in enumerate(copies[r]):
            at = n + c * B
            for j in range(B):
                p, i = cp.block * B + j, cp.block * B + j - len(prompts[r])
                want = mask_id if (i >= 0 and steps[r][i] >= cp.lo) else clean[p]
                assert pack.input_ids[r, at + j] == want
                assert pack.position_ids[r, at + j] == p  # copies reuse block b's positions
                if i >= 0 and cp.lo <= steps[r][i] < cp.hi:
                    scored.add((r, i, r * width + at + j, clean[p]))
        assert (pack.input_ids[r, n + len(copies[r]) * B:] == pad_id).all()
    # Every generated token is scored exactly once, at its copy, with its own id as the target.
    got_scores = set(zip(pack.seq_index.tolist(), pack.token_index.tolist(), pack.score_index.tolist(),
                         pack.target_ids.tolist()))
    assert got_scores == scored
    assert len(scored) == sum(len(t) for t in tokens) == len(pack.target_ids)


# -- trace logits = direct forward of the block state ------------------------------------------------


@pytest.mark.parametrize("prompt_len", [7, 8])
def test_trace_logits_equal_direct_block_forward(tiny_model, tokenizer, prompt_len):
    """Each copy's logits in the packed forward = a forward of [clean prefix ; that block state]."""
    gen = torch.Generator().manual_seed(prompt_len)
    num_gen = -(-(prompt_len + 12) // B) * B - prompt_len  # rollouts hold whole blocks
    prompt = torch.randint(4, 90, (prompt_len,), generator=gen).tolist()
    tokens = torch.randint(4, 90, (num_gen,), generator=gen).tolist()
    steps = _random_steps(prompt_len, num_gen, gen)
    copies = trace_copies(prompt_len, steps, B)
    mask_id = tokenizer.mask_token_id
    # A second, longer sequence in the same pack gives the first row padding at its end.
    other_steps = _random_steps(3, 21, gen)
    other_tokens = torch.randint(4, 90, (21,), generator=gen).tolist()
    pack = pack_traces([Trace(prompt, tokens, steps), Trace(prompt[:3], other_tokens, other_steps)],
                       [copies, trace_copies(3, other_steps, B)], B, mask_id, tokenizer.pad_token_id)
    assert (pack.meta.doc[0] < 0).any()
    with torch.no_grad():
        packed_logits = tiny_model(pack.input_ids, pack.position_ids, pack.meta).logits[0]  # (T, V)
        n = prompt_len + num_gen
        clean = prompt + tokens
        for c, cp in enumerate(copies):
            start = cp.block * B
            state = pack.input_ids[0, n + c * B: n + (c + 1) * B]
            ids = torch.tensor(clean[:start] + state.tolist())[None]
            pos = torch.arange(start + B)[None]
            meta = TokenMeta.clean(pos[:, :start], B).cat(
                TokenMeta.noisy_copy(pos[:, start:], B, torch.zeros_like(pos[:, start:])))
            direct = tiny_model(ids, pos, meta).logits[0, start:]
            torch.testing.assert_close(packed_logits[n + c * B: n + (c + 1) * B], direct, atol=1e-5, rtol=0)


def _random_steps(prompt_len: int, num_gen: int, gen: torch.Generator) -> list[int]:
    """A plausible step trace: per block, a random order, sometimes two tokens per step."""
    steps, counter, i = [], 0, 0
    while i < num_gen:
        block_end = ((prompt_len + i) // B + 1) * B - prompt_len
        width = min(block_end, num_gen) - i
        order = torch.randperm(width, generator=gen).tolist()
        block_steps = [0] * width
        for rank, j in enumerate(order):
            block_steps[j] = counter
            if rank % 2 == 1 or rank == width - 1:  # commit pairs together now and then
                counter += 1
        steps += block_steps
        i += width
    return steps


# -- SDPA and FlexAttention agree ---------------------------------------------------------------------


def test_flex_mask_mod_is_the_sdpa_mask_on_a_trace_pack(tokenizer):
    """The only input the two attention paths do not share is the mask: FlexAttention's
    ``mask_mod`` evaluated at every (query, key) pair is SDPA's dense mask on every real row
    (padding rows differ by convention). The compiled forward itself is the slow test below."""
    prompts, tokens, steps = _example_traces()
    copies = [trace_copies(len(p), s, B) for p, s in zip(prompts, steps)]
    pack = pack_traces(list(map(Trace, prompts, tokens, steps)), copies, B, tokenizer.mask_token_id,
                       tokenizer.pad_token_id)
    rows, width = pack.input_ids.shape
    b = torch.arange(rows)[:, None, None]
    q_idx, kv_idx = torch.arange(width)[None, :, None], torch.arange(width)[None, None, :]
    flex = mask_mod_for(pack.meta, pack.meta)(b, None, q_idx, kv_idx)  # (R, T, T)
    sdpa = dense_mask(pack.meta, pack.meta)[:, 0]  # (R, T, T)
    real = pack.meta.doc >= 0  # (R, T)
    assert (~real).any() and flex[real].any()
    assert torch.equal(flex[real], sdpa[real])


@pytest.mark.slow
def test_sdpa_and_flex_agree_on_trace_pack_with_padding(tiny_model, tokenizer):
    """The two attention paths give the same logits (forward only: flex backward is GPU-only).
    Slow on CPU (~30-60 s: the FlexAttention compile)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    prompts, tokens, steps = _example_traces()
    copies = [trace_copies(len(p), s, B) for p, s in zip(prompts, steps)]
    pack = pack_traces(list(map(Trace, prompts, tokens, steps)), copies, B, tokenizer.mask_token_id,
                       tokenizer.pad_token_id)
    real = pack.meta.doc >= 0  # (R, T): padding rows differ by convention (flex: zeros, sdpa: see-all)
    assert (~real).any(), "the example must contain padding"
    with torch.no_grad():
        sdpa = tiny_model(pack.input_ids, pack.position_ids, pack.meta, attn_impl="sdpa").logits
        flex = tiny_model(pack.input_ids, pack.position_ids, pack.meta, attn_impl="flex").logits
    torch.testing.assert_close(flex[real], sdpa[real], atol=1e-5, rtol=0)


# -- the O(L) FlexAttention block mask ----------------------------------------------------------------


def _random_meta(batch: int, length: int, seed: int) -> TokenMeta:
    """Packed SFT-like rows: two documents and trailing padding, block size 4."""
    gen = torch.Generator().manual_seed(seed)
    half = length // 2
    pos = torch.arange(half).repeat(batch, 1)
    doc = torch.where(pos < half // 2, 0, 1)
    doc[:, -int(torch.randint(1, 9, (1,), generator=gen)):] = -1
    return sft_meta(pos, 4, doc)


@pytest.mark.parametrize("length,max_elements", [(256, 1 << 24), (600, 1 << 24), (1000, 1 << 14)])
def test_flex_block_mask_from_tiles_equals_torch_create_block_mask(length, max_elements, monkeypatch):
    """The tile-by-tile BlockMask (no dense (Q, K) tensor) equals torch's create_block_mask, including
    ragged last tiles and several query chunks."""
    from torch.nn.attention.flex_attention import create_block_mask

    from dirl.model import attention, masks
    from dirl.model.masks import mask_mod_for

    monkeypatch.setattr(attention, "tile_visibility",
                        lambda q, k, tile: masks.tile_visibility(q, k, tile, max_elements=max_elements))
    meta = _random_meta(2, length, seed=length)
    ours = attention.flex_block_mask(meta, meta)
    ref = create_block_mask(mask_mod_for(meta, meta), 2, None, length, length, device="cpu")
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert ours.seq_lengths == ref.seq_lengths


def test_bucket_lengths_are_few_and_cover():
    from dirl.model.attention import bucket_length
    buckets = {bucket_length(n) for n in range(1, 16_385)}
    assert sorted(buckets)[:6] == [128, 256, 384, 512, 768, 1024] and len(buckets) <= 16
    assert all(n <= bucket_length(n) <= max(256, 1.5 * n) for n in range(1, 5000))  # <= 50% padding past 256


# -- SDPA's mask in query chunks (long inputs) ---------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_sdpa_mask_equals_the_dense_mask_forward_and_backward(make_tiny_model, checkpointing, monkeypatch):
    """Above MASK_PAIRS the SDPA path builds its mask per query chunk (checkpointed: rebuilt in backward);
    logits and every gradient equal the dense mask's, on packed rows with padding, inside checkpointed layers."""
    from dirl.model import attention

    meta = _random_meta(2, 96, seed=3)  # (2, 96): two documents, trailing padding
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, meta.shape, generator=gen)
    pos = torch.cat([torch.arange(48)] * 2).repeat(2, 1)
    runs = []
    for pairs in (1 << 30, 700):  # dense; chunks of 3 query rows (700 // (2 x 96))
        monkeypatch.setattr(attention, "MASK_PAIRS", pairs)
        model = make_tiny_model()
        model.train()
        model.activation_checkpointing = checkpointing
        assert isinstance(attention.build_mask(meta, meta, "sdpa"), attention.ChunkedMask) == (pairs == 700)
        logits = model(ids, pos, meta, attn_impl="sdpa").logits
        (logits[meta.doc >= 0] ** 2).mean().backward()
        runs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (dense, dense_grads), (chunked, chunked_grads) = runs
    real = meta.doc >= 0
    torch.testing.assert_close(chunked[real], dense[real], atol=1e-6, rtol=1e-5)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
