"""Continuous batching (issue 29): rollouts independent of batch composition, full batches, bounded KV,
and ``dirl serve``'s batcher feeding new requests into the running loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dirl.engine.engine import Engine
from dirl.engine.kv_cache import KVCache
from dirl.rollout import SamplingParams
from dirl.runtime import row_seed
from dirl.serve import ServeConfig
from dirl.serve.batcher import Batcher
from dirl.serve.weights import live_tensors

B = 4


def _prompts(lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 100, (n,), generator=gen).tolist() for n in lengths]


def _row_counts(model) -> list[int]:
    """The rows of every model call."""
    rows: list[int] = []
    model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows


def _key(rollouts):
    return [(r.token_ids, r.steps, r.num_tokens, r.finish_reason, r.num_forwards, r.prompt_index, r.sample_index)
            for r in rollouts]


def test_block_size_8_rows_do_not_depend_on_batch_rows(make_tiny_model):
    """Any block size: B = 8, rows at 1 and 5 and uncached give the same rollouts."""
    model = make_tiny_model(block_size=8)
    prompts = _prompts((5, 8, 3, 12, 17))
    params = SamplingParams(max_new_tokens=20, temperature=1.0, threshold=0.3, seed=4, n=2)
    reference = Engine(model, use_cache=False).generate(prompts, params)
    for options in ({"max_batch_rows": 1}, {"max_batch_rows": 5}, {"max_batch_rows": 5, "use_cache": False}):
        assert _key(Engine(model, **options).generate(prompts, params)) == _key(reference), options


def _stop_params(model, prompts) -> SamplingParams:
    """Sampled decoding with a stop token some rows produce early and others never: rows of very
    different lengths, so rows leave and join all the time."""
    params = SamplingParams(max_new_tokens=24, temperature=1.0, threshold=0.3, seed=9, n=2)
    free = [set(r.completion_ids[4:]) for r in Engine(model).generate(prompts, params)]
    params.stop_ids = [next(t for t in sorted(set.union(*free)) if 0 < sum(t in f for f in free) < len(free) // 2)]
    return params


def test_rollouts_do_not_depend_on_batch_rows_cache_or_schedule(peaky_model):
    """Same prompts and seeds: identical tokens, step ids, log-probs at 1, 3 and 16 rows, cached
    and uncached, continuous and chunked, and with prefills split over several forwards."""
    prompts = _prompts((5, 8, 3, 12, 11, 6, 17))
    params = _stop_params(peaky_model, prompts)
    reference = Engine(peaky_model, use_cache=False, max_batch_rows=16).generate(prompts, params)
    assert {r.finish_reason for r in reference} == {"stop", "length"}
    runs = [{"use_cache": cache, "max_batch_rows": rows} for cache in (True, False) for rows in (1, 3, 16)
            if cache or rows != 16]  # (uncached at 16 rows is the reference)
    runs += [{"max_batch_rows": 3, "batching": "chunked"}, {"max_batch_rows": 3, "prefill_chunk": B}]
    runs += [{"use_cache": cache, "max_batch_rows": 3, "batching": "shared"} for cache in (True, False)]
    for options in runs:
        got = Engine(peaky_model, **options).generate(prompts, params)
        assert _key(got) == _key(reference), options
        for x, y in zip(got, reference):
            torch.testing.assert_close(torch.tensor(x.logps), torch.tensor(y.logps), atol=1e-5, rtol=0)


def test_finished_rows_are_replaced_at_the_next_forward(peaky_model):
    """3 rows for 14: every forward runs 3 rows until nothing waits, then the batch only drains;
    every row of every call denoises (whole prefills ride along); fewer calls than chunked."""
    prompts = _prompts((5, 8, 3, 12, 11, 6, 17))
    params = _stop_params(peaky_model, prompts)
    rows = _row_counts(peaky_model)
    rollouts = Engine(peaky_model, max_batch_rows=3, prefill_chunk=64).generate(prompts, params)
    continuous = list(rows)
    assert sum(continuous) == sum(r.num_forwards for r in rollouts)  # no idle row in any forward
    first_short = next(i for i, n in enumerate(continuous) if n < 3)
    tail = continuous[first_short:]
    assert tail == sorted(tail, reverse=True)  # once short, it only drains
    rows.clear()
    Engine(peaky_model, max_batch_rows=3, batching="chunked").generate(prompts, params)
    assert len(continuous) < len(rows)


def test_a_long_prompt_prefills_over_several_forwards_while_others_decode(peaky_model):
    """prefill_chunk 16 at a full batch of 2: the 40 clean tokens of a 41-token prompt go in over
    three forwards beside the other row's steps; its rollout is the same as alone."""
    prompts = _prompts((3, 41))
    params = SamplingParams(max_new_tokens=8, temperature=0.0, unmasking="sequential")
    alone = Engine(peaky_model).generate(prompts[1:], params)
    widths: list[int] = []
    peaky_model.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]))
    got = Engine(peaky_model, prefill_chunk=16, max_batch_rows=2).generate(prompts, params)
    assert _key(got[1:]) == [(*k[:5], 1, 0) for k in _key(alone)]
    assert widths[:3] == [16 + B, 16 + B, 8 + B]  # 16 + 16 + 8 clean tokens, each beside a block
    assert len(widths) == 2 + got[1].num_forwards  # its counter starts in the forward that ends its prefill
    widths.clear()  # one row live of 4: it may write 4x as many, the whole prompt at once
    assert _key(Engine(peaky_model, prefill_chunk=16, max_batch_rows=4).generate(prompts[1:], params)) == _key(alone)
    assert widths[0] == 40 + B


def test_kv_budget_caps_live_rows_and_peak_memory_follows_them(make_tiny_model):
    """max_batch_tokens = 3 rows' slots: never more than 3 rows; the cache's peak (one layer's
    transient included) is within 1.2x the theoretical cache of the rows live (8 layers)."""
    model = make_tiny_model(num_hidden_layers=8)
    prompts = _prompts((5, 8, 3, 12, 11, 6))
    params = SamplingParams(max_new_tokens=16, temperature=1.0, threshold=0.3, seed=2, n=2)
    slots = max(len(p) for p in prompts) + params.max_new_tokens + 2 * B
    rows, caches = _row_counts(model), []
    original = KVCache.for_model
    KVCache.for_model = classmethod(lambda cls, *a: caches.append(original(*a)) or caches[-1])
    try:
        got = Engine(model, max_batch_rows=16, max_batch_tokens=3 * slots).generate(prompts, params)
    finally:
        KVCache.for_model = original
    assert max(rows) == 3 and len(got) == 12
    assert _key(got) == _key(Engine(model, max_batch_rows=16).generate(prompts, params))
    cfg = model.config
    per_row = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4 * slots  # fp32
    assert 0.8 * 3 * per_row <= caches[0].peak_bytes <= 1.2 * 3 * per_row  # ~3 rows, never more
    # Time sharing holds as many rows as the budget allows (5 here), and runs 2 at a time.
    rows.clear(), caches.clear()
    KVCache.for_model = classmethod(lambda cls, *a: caches.append(original(*a)) or caches[-1])
    try:
        shared = Engine(model, max_batch_rows=2, max_batch_tokens=5 * slots, batching="shared").generate(prompts,
                                                                                                        params)
    finally:
        KVCache.for_model = original
    assert _key(shared) == _key(got) and max(rows) == 2
    assert 0.8 * 5 * per_row <= caches[0].peak_bytes <= 1.2 * 5 * per_row


# -- serving: new requests join the running loop ----------------------------------------------------------


def test_a_request_joins_the_running_loop_and_finishes_first(tiny_model):
    """A long job is decoding; a short one submitted mid-run joins the same engine loop (one call),
    returns before the long one ends, and decodes exactly as alone."""
    long_params = SamplingParams(max_new_tokens=64, n=2, seed=1, stop_ids=[])
    short = [[7, 8, 9]]
    short_params = SamplingParams(max_new_tokens=8, seed=1, stop_ids=[])
    expected = Engine(tiny_model).generate(short, short_params, seeds=[11])
    batcher = Batcher(tiny_model, live_tensors(tiny_model), ServeConfig(batch_wait_ms=0, max_batch=8))
    jobs, order = [], []
    calls: list[int] = []

    def hook(*_):
        calls.append(1)
        if len(calls) == 5:  # on the worker thread, mid-loop
            jobs.append(batcher.submit_generate(short, [11], short_params))
            jobs[-1].future.add_done_callback(lambda f: order.append(("short", len(calls))))

    tiny_model.register_forward_hook(hook)
    batcher.start()
    try:
        jobs.append(batcher.submit_generate([[1, 2, 3, 4, 5]], [0], long_params))
        jobs[0].future.add_done_callback(lambda f: order.append(("long", len(calls))))
        long_result = jobs[0].future.result(timeout=120)
        short_result = jobs[1].future.result(timeout=120)
    finally:
        batcher.close()
    assert [name for name, _ in order] == ["short", "long"]
    assert [r.token_ids for r in short_result.rollouts] == [r.token_ids for r in expected]
    assert len(long_result.rollouts) == 2


@pytest.mark.parametrize("batching,first", [("continuous", "long"), ("shared", "short")])
def test_time_shared_serving_runs_a_short_request_beside_a_full_batch(tiny_model, batching, first):
    """Two rows of a long job fill max_batch=2; a short request arrives mid-run. FIFO makes it
    wait for a long row to end; time sharing runs it at once (fewest forwards first), so it
    finishes first, with the tokens it has alone."""
    long_params = SamplingParams(max_new_tokens=64, n=2, seed=1, stop_ids=[])
    short, short_params = [[7, 8, 9]], SamplingParams(max_new_tokens=8, seed=1, stop_ids=[])
    expected = Engine(tiny_model).generate(short, short_params, seeds=[11])
    batcher = Batcher(tiny_model, live_tensors(tiny_model), ServeConfig(batch_wait_ms=0, max_batch=2,
                                                                        batching=batching))
    jobs, order, calls = [], [], []

    def hook(*_):
        calls.append(1)
        if len(calls) == 5:  # on the worker thread, mid-loop
            jobs.append(batcher.submit_generate(short, [11], short_params))
            jobs[-1].future.add_done_callback(lambda f: order.append("short"))

    tiny_model.register_forward_hook(hook)
    batcher.start()
    try:
        jobs.append(batcher.submit_generate([[1, 2, 3, 4, 5]], [0], long_params))
        jobs[0].future.add_done_callback(lambda f: order.append("long"))
        jobs[0].future.result(timeout=120)
        short_result = jobs[1].future.result(timeout=120)
    finally:
        batcher.close()
    assert order[0] == first
    assert [r.token_ids for r in short_result.rollouts] == [r.token_ids for r in expected]


def test_an_update_is_a_barrier_for_the_running_loop(tiny_model):
    """Jobs queued after an update never join the loop that runs on the old weights."""
    params = SamplingParams(max_new_tokens=32, seed=1, stop_ids=[])
    batcher = Batcher(tiny_model, live_tensors(tiny_model), ServeConfig(batch_wait_ms=0, max_batch=8))
    new_weights = {name: t.clone() for name, t in live_tensors(tiny_model).items()}
    futures = {}

    def hook(*_):
        if "update" not in futures:
            futures["update"] = batcher.submit_update(new_weights)
            futures["after"] = batcher.submit_generate([[4, 5, 6]], [3], params).future

    handle = tiny_model.register_forward_hook(hook)
    batcher.start()
    try:
        before = batcher.submit_generate([[1, 2, 3]], [0], params).future.result(timeout=120)
        assert futures["update"].result(timeout=120) == 1
        after = futures["after"].result(timeout=120)
    finally:
        handle.remove()
        batcher.close()
    assert (before.weight_version, after.weight_version) == (0, 1)
    assert batcher.stats["engine_calls"] == 2


# -- the full-attention decoder (LLaDA, Dream): the same loop over a left-padded frame -------------------


def _full_attention_case(family: str, rule: str = "dynamic"):
    from tests.fullattn_models import tiny_model as fullattn_model
    model = fullattn_model(family, seed=5)
    prompts = _prompts((5, 2, 9, 3, 12, 6, 4), seed=1)
    prompts = [[t % 46 + 2 for t in p] for p in prompts]  # below the tiny vocabulary's [MASK] (47)
    params = SamplingParams(max_new_tokens=12, block_length=4, temperature=0.9, top_k=20, unmasking=rule,
                            steps_per_block=4, threshold=0.25, alg_temp=0.5 if rule == "maskgit_plus" else 0.0,
                            seed=3, n=2)
    return model, prompts, params


def _assert_same(got, reference, options):
    assert _key(got) == _key(reference), options
    for x, y in zip(got, reference):
        torch.testing.assert_close(torch.tensor(x.logps), torch.tensor(y.logps), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,rule", [("llada", "dynamic"), ("dream", "dynamic"), ("dream", "maskgit_plus")])
def test_full_attention_rollouts_do_not_depend_on_batch_rows(family, rule):
    """Same prompts and seeds: identical tokens, step ids, log-probs at 1, 3 and 16 rows and chunked,
    while rows of 2-12 prompt tokens and different forward counts join and leave the padded frame."""
    model, prompts, params = _full_attention_case(family, rule)
    rows = _row_counts(model)
    reference = Engine(model, max_batch_rows=16).generate(prompts, params)
    if rule == "dynamic":
        assert len({r.num_forwards for r in reference}) > 2  # rows leave at different forwards
    for options in ({"max_batch_rows": 3, "batching": "chunked"}, {"max_batch_rows": 1}, {"max_batch_rows": 3},
                    {"max_batch_rows": 3, "batching": "shared"}):
        rows.clear()
        _assert_same(Engine(model, **options).generate(prompts, params), reference, options)
    assert max(rows) == 3 and sum(rows) == sum(r.num_forwards for r in reference)  # no idle row in any call


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_time_sharing_runs_the_least_served_rows_and_keeps_the_batch_full(family, peaky_model):
    """``shared``: every row is admitted at once and each forward runs the 3 rows with the fewest
    forwards, so the batch stays full until fewer than 3 rows are left, and those are the longest:
    the calls with fewer rows are (longest - third longest) forwards, up to the rounding of turns,
    fewer than FIFO's drain. Rollouts are FIFO's (block-causal: with paused rows' cache rows kept)."""
    if family == "sdar":
        model, prompts = peaky_model, _prompts((5, 8, 3, 12, 11, 6, 17))
        params, options = _stop_params(model, prompts), {"prefill_chunk": 64}  # whole prefills ride along
    else:
        (model, prompts, params), options = _full_attention_case("llada"), {}
    rows = _row_counts(model)
    reference = Engine(model, max_batch_rows=3, **options).generate(prompts, params)
    fifo = list(rows)
    rows.clear()
    got = Engine(model, max_batch_rows=3, batching="shared", **options).generate(prompts, params)
    _assert_same(got, reference, "shared")
    longest = sorted((r.num_forwards for r in reference), reverse=True)
    assert rows == sorted(rows, reverse=True) and sum(rows) == sum(longest)  # full, then the tail only shrinks
    assert sum(n < 3 for n in rows) <= longest[0] - longest[2] + 2 < sum(n < 3 for n in fifo)


def test_full_attention_finished_rows_are_replaced_at_the_next_forward():
    """3 rows for 14: every call runs 3 rows until nothing waits, then the batch only drains;
    fewer calls than the chunked schedule; a frame that re-pads as longer rows join."""
    model, prompts, params = _full_attention_case("llada")
    rows, widths = _row_counts(model), []
    model.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]))
    Engine(model, max_batch_rows=3).generate(prompts, params)
    continuous = list(rows)
    first_short = next(i for i, n in enumerate(continuous) if n < 3)
    assert set(continuous[:first_short]) == {3} and continuous[first_short:] == sorted(continuous[first_short:],
                                                                                        reverse=True)
    assert len(set(widths)) > 2  # the frame widens and narrows as rows join and leave
    rows.clear()
    Engine(model, max_batch_rows=3, batching="chunked").generate(prompts, params)
    assert len(continuous) < len(rows)


def test_full_attention_rows_of_different_lengths_share_forwards():
    """A feed whose rows want 4, 8 and 12 tokens: one loop, each row as decoded alone."""
    from dirl.engine.scheduler import ListFeed, RowRequest
    model, prompts, params = _full_attention_case("dream")
    lengths = (4, 12, 8, 4, 12)
    feed = ListFeed([RowRequest(p, row_seed(7 + i, 0), i, 0, owner=i, max_new_tokens=n) for i, (p, n) in
                     enumerate(zip(prompts, lengths))])
    rows = _row_counts(model)
    Engine(model, max_batch_rows=3).decode(feed, params)
    assert max(rows) == 3 and [len(r.token_ids) for r in feed.results] == list(lengths)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        alone = Engine(model).generate([p], dataclasses.replace(params, max_new_tokens=n, n=1), seeds=[7 + i])[0]
        alone.prompt_index = i
        _assert_same([feed.results[i]], [alone], i)


def test_full_attention_approximate_cache_keeps_whole_chunks():
    """cache: prefix shares its recording forwards across the batch, so it does not batch
    continuously: rows join only when the chunk is done (the row count never grows mid-chunk)."""
    model, prompts, params = _full_attention_case("llada")
    params = dataclasses.replace(params, cache="prefix")
    rows = _row_counts(model)
    got = Engine(model, max_batch_rows=4).generate(prompts, params)
    assert all(r is not None and len(r.token_ids) == 12 for r in got)
    forwards = [r.num_forwards for r in got]
    chunks = [forwards[i: i + 4] for i in range(0, 14, 4)]  # 14 rows: 4 + 4 + 4 + 2
    assert sum(rows) == sum(forwards) and len(rows) == sum(max(c) for c in chunks)  # each drains alone
    assert any(min(c) < max(c) for c in chunks)  # (and some chunk does drain: rows could have joined)
