"""The engine (glmkit/engine): one slot or eight, prefix cache hit or missed, chunked or whole prefill -- the same
greedy tokens for every generation, each compared with a fresh single-slot engine that reuses nothing and reads
every prompt in one piece. Plus the prefix cache's memory rules, prefill chunks between decode steps (counted
in engine steps, never timed), and model.forward using the positions and masks it is given."""
from __future__ import annotations

import pytest
import torch

from conftest import GENERATIONS, expected, needs_shared, ref_pipeline
from glmkit.engine import Engine, KVCache, PrefixCache, Sequence
from glmkit.quant import QuantSpec, prepare_model, quantize_model
from glmkit.sampling import SamplingParams
from test_model import PRESETS, prompt_for, tiny

GREEDY = SamplingParams(temperature=0, max_new_tokens=10)


def run_all(engine: Engine, prompts, params=GREEDY, states=None):
    """Submit every prompt at once and step the engine on this thread until all are done
    -> (tokens per prompt, Sequences)."""
    outs = [[] for _ in prompts]
    seqs = []
    for i, p in enumerate(prompts):
        seq = Sequence(p, params, emit=lambda ev, i=i: ev[0] == "token" and outs[i].append(ev[1]),
                       state=None if states is None else states[i])
        engine.submit(seq)
        seqs.append(seq)
    while engine.busy:
        engine.step()
    assert all(s.finished in ("stop", "length") for s in seqs), [s.finished for s in seqs]
    return outs, seqs


def alone(model, prompt, params=GREEDY, state=None):
    """The reference: a fresh one-slot engine, nothing reused, the prompt read whole."""
    eng = Engine(model, 128, cache_mb=0, prefill_chunk=10_000)
    return list(eng.generate(prompt, params, state=state))


def prompt_set(m):
    """Prompts that share prefixes (a 'system prompt', a second turn) and ones that do not."""
    cfg = m.config
    sys_ = list(range(20, 60))                                  # 40 shared tokens
    if cfg.family == "chatglm":                                 # [gMASK] <sop> at the end, context before it
        end = [cfg.gmask_token_id, cfg.sop_token_id]
        return [sys_ + [70, 71] + end, sys_ + [72] + end, sys_ + [70, 71] + end, list(range(5, 15)) + end,
                prompt_for(m, n=30, mask="mask"), sys_ + [72] + end]
    a = sys_ + [70, 71, 72]
    return [a, sys_ + [80, 81], list(range(5, 12)), a + [90, 91, 92, 93], sys_ + [80, 81], a]


@pytest.mark.parametrize("name", PRESETS)
def test_same_greedy_tokens_with_one_slot_eight_slots_cache_hit_and_miss_chunked_and_whole(name):
    m = tiny(name)
    prompts = prompt_set(m)
    want = [alone(m, p) for p in prompts]
    # one slot (the Pipeline's engine), small chunks, prefix cache on: later prompts hit earlier ones
    one = Engine(m, 128, slots=1, prefill_chunk=5)
    got1 = []
    for p in prompts:
        s = one.generate(p, GREEDY)
        got1.append((list(s), s.stats.reused_tokens))
    assert [t for t, _ in got1] == want
    reused = [r for _, r in got1]
    if m.config.family == "chatglm":                  # only a repeated bidirectional context is reusable
        assert reused[0] == reused[1] == reused[3] == 0 and reused[2] > 40 and reused[5] > 40
    else:                                             # misses, the shared 40 tokens, longer repeats
        assert reused[0] == reused[2] == 0 and reused[1] >= 32 and reused[3] >= 43 and reused[4] > 40
    # eight slots, everything at once, small chunks, cache on / whole prompts, cache off
    for chunk, mb in ((3, 64), (10_000, 0)):
        eng = Engine(m, 128, slots=8, prefill_chunk=chunk, cache_mb=mb)
        got, seqs = run_all(eng, prompts)
        assert got == want, (chunk, mb)
        if mb == 0:
            assert all(s.stats.reused_tokens == 0 for s in seqs)
        else:                                         # running at once: copied from the slot that read it
            assert eng.stats.from_slots > 0
        # a second wave: every prompt now finds its keys/values cached (in its slot or the prefix cache)
        again, seqs = run_all(eng, prompts)
        assert again == want
        if mb:
            assert all(s.stats.reused_tokens > 0 for s in seqs)


def test_chatglm6b_context_longer_than_a_chunk_is_read_layer_by_layer():
    """ChatGLM-6B's context is bidirectional: a chunk of its tokens alone would give other keys/values. The
    engine reads it whole a few layers per step instead (more steps than one, same tokens)."""
    m = tiny("chatglm-6b")
    cfg = m.config
    prompt = list(range(3, 60)) + [cfg.gmask_token_id, cfg.sop_token_id]
    want = alone(m, prompt)
    eng = Engine(m, 128, prefill_chunk=8)
    s = eng.generate(prompt, GREEDY)
    assert list(s) == want
    assert eng.stats.chunks >= 3                 # 58 context tokens, 8 tokens x 3 layers per step: 1 layer each
    # the same prompt again: the whole context is reused (it is the same), only <sop> is read
    s2 = eng.generate(prompt, GREEDY)
    assert list(s2) == want and s2.stats.reused_tokens == len(prompt) - 1
    # a different context that starts the same reuses nothing (its keys/values differ everywhere)
    other = list(range(3, 50)) + [99, cfg.gmask_token_id, cfg.sop_token_id]
    s3 = eng.generate(other, GREEDY)
    assert list(s3) == alone(m, other) and s3.stats.reused_tokens == 0


def test_chatglm6b_infill_state_is_part_of_the_key():
    """Blank infilling passes its own SeqState (the mask a span belongs to); a cached prompt with another mask
    position must not be reused."""
    from glmkit.model import SeqState
    m = tiny("chatglm-6b")
    cfg = m.config
    ids = [5, 6, cfg.mask_token_id, 7, 8, cfg.mask_token_id, 9, cfg.sop_token_id]
    first, second = SeqState(torch.tensor([7]), torch.tensor([2])), SeqState(torch.tensor([7]), torch.tensor([5]))
    eng = Engine(m, 128)
    a = eng.generate(ids, GREEDY, state=first)
    assert list(a) == alone(m, ids, state=first)
    b = eng.generate(ids, GREEDY, state=second)
    assert list(b) == alone(m, ids, state=second) and b.stats.reused_tokens == 0


def _int4(name="chatglm3-6b"):
    m = tiny(name)
    quantize_model(m, QuantSpec.parse("int4"))
    prepare_model(m)
    return m


def test_quantized_model_on_the_fused_path_gives_the_same_tokens():
    m = _int4()
    prompts = prompt_set(m)
    want = [alone(m, p) for p in prompts]
    eng = Engine(m, 128, slots=8, prefill_chunk=4)
    got, _ = run_all(eng, prompts)
    again, seqs = run_all(eng, prompts)
    assert got == want and again == want and all(s.stats.reused_tokens > 0 for s in seqs)


def test_prefill_chunks_run_between_decode_steps():
    """While a long prompt joins, a running stream gets one token per engine step: the joining prompt is read
    at most one chunk per step."""
    m = tiny("chatglm3-6b-32k")
    eng = Engine(m, 128, slots=2, prefill_chunk=4, cache_mb=0)
    a_tokens, b_tokens = [], []
    a = Sequence(list(range(3, 9)), SamplingParams(temperature=0, max_new_tokens=40, ),
                 emit=lambda ev: ev[0] == "token" and a_tokens.append(ev[1]))
    eng.submit(a)
    while not a_tokens:
        eng.step()
    b = Sequence(list(range(10, 50)), GREEDY, emit=lambda ev: ev[0] == "token" and b_tokens.append(ev[1]))
    eng.submit(b)
    read = []
    while not b_tokens:
        n = len(a_tokens)
        eng.step()
        assert len(a_tokens) == n + 1                     # the stream did not wait for the whole prompt
        read.append(min(b.pos, len(b.prompt)))           # (it may decode in the step that ends its prompt)
    assert len(read) == 10 and all(y - x <= 4 for x, y in zip([0] + read, read))
    while eng.busy:
        eng.step()
    assert a_tokens == alone(m, a.prompt, a.params) and b_tokens == alone(m, b.prompt)



def test_a_prompt_alone_is_read_in_the_larger_chunk():
    """No stream decoding: prefill_chunk_alone tokens per step (nobody waits on the step); once one decodes, the
    next prompt goes back to prefill_chunk. The default on CPU: 128 alone, 32 beside others."""
    m = tiny("chatglm3-6b")
    d = Engine(m, 64)
    assert (d.prefill_chunk, d.prefill_chunk_alone) == (32, 128)
    assert Engine(m, 64, prefill_chunk=8).prefill_chunk_alone == 8          # an explicit chunk means both
    eng = Engine(m, 128, slots=2, prefill_chunk=4, prefill_chunk_alone=16, cache_mb=0)
    a = Sequence(list(range(3, 43)), SamplingParams(temperature=0, max_new_tokens=30))
    eng.submit(a)
    reads, pos = [], 0
    for _ in range(10):
        eng.step()
        reads.append(min(a.pos, len(a.prompt)) - pos)
        pos = min(a.pos, len(a.prompt))
        if a.prefill is None:
            break
    assert reads == [16, 16, 8]                          # 40 tokens alone: 16 per step
    b = Sequence(list(range(50, 70)), GREEDY)
    eng.submit(b)
    eng.step()                                           # b admitted and its first 4 tokens read beside a
    assert b.pos == 4
    while eng.busy:
        eng.step()
    assert b.finished in ("stop", "length")


def test_cancel_and_reuse_after_cancel():
    m = tiny("glm-4-9b")
    eng = Engine(m, 128)
    p = list(range(3, 40))
    s = eng.generate(p, SamplingParams(temperature=0, max_new_tokens=30))
    first = [next(s) for _ in range(3)]
    s.close("cancelled")
    assert s.stats.finish_reason == "cancelled" and not eng.busy
    s2 = eng.generate(p + first, GREEDY)
    assert list(s2) == alone(m, p + first) and s2.stats.reused_tokens == len(p) + 2


# --- the prefix cache's memory rules -----------------------------------------------------------------------

def _kv(n, fill):
    return torch.full((2, 2, 1, n, 4), float(fill))


def test_prefix_cache_reuses_to_the_token_within_its_budget_and_evicts_least_recently_used():
    per_token = 2 * 2 * 1 * 4 * 4                                 # bytes of one position in _kv
    pc = PrefixCache(budget_bytes=6 * 4 * per_token, bytes_per_token=per_token, block=4)   # room for 6 blocks
    a, b, c = list(range(100, 112)), list(range(200, 212)), list(range(100, 104)) + list(range(300, 308))

    def stops(ids):
        chain, n = pc.match(ids)
        return [nd.stop for nd in chain], n

    assert pc.insert(a, 12, lambda s, e: _kv(e - s, s)) == 3
    assert pc.insert(b, 12, lambda s, e: _kv(e - s, -s)) == 3
    assert pc.bytes == pc.budget
    assert stops(a + [1, 2]) == ([4, 8, 12], 12)
    assert stops(a[:10] + [7]) == ([4, 8, 12], 10)                 # to the token: 2 of the third block
    chain, _ = pc.match(a)
    assert float(chain[1].kv_of(5, 6)[0, 0, 0, 0, 0]) == 4.0       # the block of positions 4..8
    # c shares a's first block; its two new blocks evict b's leaves (least recently used) first
    assert pc.insert(c, 12, lambda s, e: _kv(e - s, 7)) == 2
    assert pc.bytes <= pc.budget and len(pc) == 6 and pc.evictions == 2
    assert stops(b) == ([4], 4)                                     # b lost its last two blocks
    assert stops(c) == ([4, 8, 12], 12) and stops(a) == ([4, 8, 12], 12)
    # a partial last block is kept as a shorter node, and dropped when a whole block extends it
    assert pc.insert([500, 501, 502], 3, lambda s, e: _kv(e - s, 0)) == 1
    assert stops([500, 501, 502, 9]) == ([3], 3) and pc.bytes <= pc.budget
    assert pc.insert([500, 501, 502, 503, 504], 5, lambda s, e: _kv(e - s, 0)) == 2
    assert stops([500, 501, 502, 503, 504]) == ([4, 5], 5) and len(pc.roots[None].kids) <= 3
    assert pc.bytes <= pc.budget
    assert pc.match([999] + a[1:]) == ([], 0)                       # a different first token shares nothing
    off = PrefixCache(0, per_token)
    assert off.insert(a, 12, lambda s, e: _kv(e - s, 0)) == 0 and off.match(a) == ([], 0)


def test_prefix_cache_context_unit_is_reused_whole_or_not_at_all():
    pc = PrefixCache(1 << 20, 64, block=4)
    ids = list(range(10, 20)) + [1, 2, 3]                           # a 10-token context, then 3 tokens
    pc.insert(ids, 13, lambda s, e: _kv(e - s, 0), head=10, tag=(10, 9))
    assert pc.match(ids, head=10, tag=(10, 9))[1] == 13
    assert pc.match(ids[:9] + [0] + ids[10:], head=10, tag=(10, 9)) == ([], 0)
    assert pc.match(ids, head=10, tag=(10, 8)) == ([], 0)           # another mask position: another root


def test_prefix_cache_stays_within_the_budget_in_the_engine():
    m = tiny("chatglm2-6b")
    eng = Engine(m, 128, slots=2, cache_mb=0.05)                # 52 kB: a few blocks of this model
    eng.ensure_cache()
    for k in range(12):
        list(eng.generate([k + 3] + list(range(30, 70)), GREEDY))
        assert eng.prefix.bytes <= eng.prefix.budget
    assert eng.prefix.evictions > 0


def test_kv_cache_read_write_round_trip():
    m = tiny("glm-4-9b")
    cache = KVCache.for_model(m, 2, 32)
    for t in cache.k + cache.v:
        t.normal_()
    block = cache.read(1, 3, 9)
    assert block.shape == (m.config.num_layers, 2, m.config.num_kv_heads, 6, m.config.head_dim)
    cache.write(0, 10, block)
    assert torch.equal(cache.read(0, 10, 16), block)
    assert cache.bytes_per_token == 2 * m.config.num_layers * m.config.num_kv_heads * m.config.head_dim * 4


# --- model.forward takes what it is given --------------------------------------------------------------------

def test_forward_derives_state_only_when_it_needs_it(monkeypatch):
    m = tiny("chatglm-6b")
    ids = torch.tensor([prompt_for(m)])
    T = ids.shape[1]
    want = m(ids)
    state = m.sequence_state(ids)
    rope_pos = torch.stack([torch.where(torch.arange(T) < state.ctx_len, torch.arange(T), state.mask_pos),
                            torch.where(torch.arange(T) < state.ctx_len, 0, torch.arange(T) - state.ctx_len + 1)])
    mask = m._mask_for(torch.arange(T)[None], torch.arange(T), state)

    def boom(*a, **k):
        raise AssertionError("sequence_state called although positions and mask were given")
    monkeypatch.setattr(m, "sequence_state", boom)
    got = m(ids, position_ids=rope_pos[None], attention_mask=mask)
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(AssertionError, match="sequence_state"):
        m(ids)                                                   # nothing given: it derives them


# --- the official reference checkpoints (their greedy tokens, computed by the official code) ----------------

@needs_shared
@pytest.mark.parametrize("gen", list(GENERATIONS))
def test_official_greedy_tokens_with_every_engine_setting(gen):
    pipe = ref_pipeline(gen)
    cases = expected()[gen]
    ids, want = [c["input_ids"] for c in cases], [c["greedy_12"] for c in cases]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    one = Engine(pipe.model, 256, prefill_chunk=2)
    for p, w in zip(ids + ids, want + want):                  # the second round hits the first
        assert list(one.generate(p, params)) == w
    for chunk, mb in ((2, 64), (10_000, 0)):                  # eight slots, all at once, twice each
        got, seqs = run_all(Engine(pipe.model, 256, slots=8, prefill_chunk=chunk, cache_mb=mb), ids + ids, params)
        assert got == want + want, (chunk, mb)
        assert (sum(s.stats.reused_tokens for s in seqs) > 0) == (mb > 0)
