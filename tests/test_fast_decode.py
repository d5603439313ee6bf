"""The fused decode path (glmkit/engine/fast_decode.py + kernels/decode_ops.c) against model.forward and plain
torch."""
from __future__ import annotations

import copy
import queue

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_kernels
from glmkit.config import ModelConfig
from glmkit.engine import Engine, KVCache, Sequence
from glmkit.engine.fast_decode import FastDecoder, why_not
from glmkit.model import GLM, apply_rope
from glmkit.quant import QuantSpec, prepare_model, quantize_model
from glmkit.sampling import SamplingParams

pytestmark = needs_kernels                                   # the fused path is off without them


@pytest.fixture(params=["avx2", "scalar"])
def impl(request):
    from glmkit import kernels
    ext = kernels._extension()
    ext.set_impl(request.param)
    yield ext
    ext.set_impl("auto")


# --- the C ops against torch -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [256, 4096, 37])
def test_rmsnorm_with_residual_add(impl, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g) * 3
    res = torch.randn(3, n, generator=g)
    w = torch.rand(n, generator=g) + 0.5
    out = torch.empty(3, n)
    x1 = x.clone()
    impl.rmsnorm(x1.data_ptr(), res.data_ptr(), w.data_ptr(), out.data_ptr(), 3, n, 1e-5)
    xs = x + res
    assert torch.equal(x1, xs)                                  # the residual stream is updated in place
    ref = w * (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)
    x2 = x.clone()                                              # without a residual: x untouched
    impl.rmsnorm(x2.data_ptr(), 0, w.data_ptr(), out.data_ptr(), 3, n, 1e-5)
    assert torch.equal(x2, x)
    torch.testing.assert_close(out, w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)), rtol=2e-6,
                               atol=1e-6)


@pytest.mark.parametrize("F_", [13696, 8, 29])
def test_swiglu(impl, F_):
    g = torch.Generator().manual_seed(F_)
    h = torch.randn(2, 2 * F_, generator=g) * 6
    h[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -88.5])        # saturating exp on both sides
    out = torch.empty(2, F_)
    impl.swiglu(h.data_ptr(), out.data_ptr(), 2, F_)
    ref = F.silu(h[:, :F_]) * h[:, F_:]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def _attend_ref(qkv, cos, sin, kc, vc, H, G, D, R, interleaved, pos, kv_len):
    """Plain torch: rotary, fp16 cache write, then attention over [0, kv_len) (what model.py does)."""
    q = qkv[:H * D].view(H, D).clone()
    k = qkv[H * D:(H + G) * D].view(G, D).clone()
    v = qkv[(H + G) * D:].view(G, D)
    q[:, :R] = apply_rope(q[:, :R], cos, sin, interleaved)
    k[:, :R] = apply_rope(k[:, :R], cos, sin, interleaved)
    kc, vc = kc.clone(), vc.clone()
    kc[:, pos], vc[:, pos] = k.half(), v.half()
    K, V = kc[:, :kv_len].float(), vc[:, :kv_len].float()                  # [G, S, D]
    rep = H // G
    y = F.scaled_dot_product_attention(q.view(G, rep, D), K, V)           # [G, rep, D]
    return y.reshape(H * D), kc, vc


@pytest.mark.parametrize("H,G,D,R,interleaved,pos,kv_len", [
    (32, 2, 128, 64, True, 0, 1),            # ChatGLM3: first token
    (32, 2, 128, 64, True, 600, 601),        # long enough to use the thread pool
    (8, 8, 64, 32, False, 5, 6),             # no grouping, rotate-half
    (6, 3, 20, 10, True, 9, 10),             # head_dim not a multiple of 8: scalar loops
    (4, 1, 32, 16, True, 3, 7),              # later positions present in the cache are attended too
])
def test_attend(impl, H, G, D, R, interleaved, pos, kv_len):
    g = torch.Generator().manual_seed(pos + D)
    S = 640
    qkv = torch.randn((H + 2 * G) * D, generator=g)
    qkv[H * D] = 1e-6                                           # an fp16 subnormal after rounding
    ang = torch.rand(R // 2, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    kc = (torch.randn(G, S, D, generator=g)).half()
    vc = (torch.randn(G, S, D, generator=g)).half()
    y_ref, kc_ref, vc_ref = _attend_ref(qkv, cos, sin, kc, vc, H, G, D, R, interleaved, pos, kv_len)
    y = torch.empty(H * D)
    q1 = qkv.clone()
    impl.attend(q1.data_ptr(), cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(), y.data_ptr(), H, G, D,
                R, int(interleaved), pos, kv_len, S * D)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # fp16 rounding = torch's .half()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_attend_rejects_bad_sizes():
    from glmkit import kernels
    ext = kernels._extension()
    t = torch.zeros(1024)
    h = torch.zeros(1024, dtype=torch.float16)
    with pytest.raises(ValueError, match="bad sizes"):        # kv_len must cover the new position
        ext.attend(t.data_ptr(), t.data_ptr(), t.data_ptr(), h.data_ptr(), h.data_ptr(), t.data_ptr(),
                   4, 3, 8, 4, 1, 5, 5, 64)


# --- the decode step against model.forward -----------------------------------------------------------------

def _model(bits=4, D=32, interleaved=True, bias=True, seed=1, layers=3, max_seq=96):
    cfg = ModelConfig(family="chatglm3", vocab_size=320, hidden_size=256, num_layers=layers, num_heads=8,
                      num_kv_heads=2, head_dim=D, ffn_hidden_size=352, max_seq_len=max_seq,
                      rope_interleaved=interleaved, qkv_bias=bias, out_bias=bias, mlp_bias=bias)
    m = GLM(cfg).init_weights(std=0.05, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:                                     # norms not all ones, biases not all zero
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    quantize_model(m, QuantSpec.parse(f"int{bits}"))
    prepare_model(m)
    return m


def _pair(model, batch, max_seq):
    """The model and a copy, each with its own cache."""
    a, b = model, copy.deepcopy(model)
    prepare_model(b)
    return (a, KVCache.for_model(a, batch, max_seq)), (b, KVCache.for_model(b, batch, max_seq))


@pytest.mark.parametrize("bits,D,interleaved,bias", [(4, 32, True, True), (8, 32, True, False),
                                                     (4, 20, False, True), (8, 64, False, False)])
def test_step_equals_forward(bits, D, interleaved, bias):
    """20 decode steps, each from the same cache contents in both paths. Both quantize activations to int8 per
    block in the GEMMs, so a difference in the last float bit can flip one rounding and move the logits by
    quantization noise (~3e-2 here, the same size as either path's distance from an unquantized-activation
    reference); at most 2 of 20 steps may do that, the rest agree to float precision."""
    (ref, rc), (fused, fc) = _pair(_model(bits, D, interleaved, bias), 1, 96)
    fd = FastDecoder(fused, fc)
    ids = torch.randint(0, 320, (1, 50), generator=torch.Generator().manual_seed(3))
    errs = []
    with torch.inference_mode():
        for m, c in ((ref, rc), (fused, fc)):
            m(ids[:, :30], c, cache_pos=torch.arange(30)[None], kv_len=30)
        for p in range(30, 50):
            for ka, kb, va, vb in zip(rc.k, fc.k, rc.v, fc.v):
                kb.copy_(ka)
                vb.copy_(va)
            want = ref(ids[:, p:p + 1], rc, cache_pos=torch.tensor([[p]]), kv_len=p + 1)[:, -1]
            got = fd.step([int(ids[0, p])], [p], [0])
            # the keys/values written at p: equal up to one fp16 rounding of values equal to float precision
            kv = max(((kb[:, :, p].float() - ka[:, :, p].float()).abs() / (ka[:, :, p].float().abs() + 1e-2))
                     .max().item() for ka, kb in zip(rc.k, fc.k))
            errs.append(((got - want).abs().max().item(), kv))
    assert sum(e < 2e-6 and kv <= 1e-3 for e, kv in errs) >= 18, errs
    assert max(e for e, _ in errs) < 0.1 and max(kv for _, kv in errs) < 0.5, errs


def test_step_of_several_rows_at_their_own_positions():
    (ref, rc), (fused, fc) = _pair(_model(4), 4, 96)
    fd = FastDecoder(fused, fc)
    g = torch.Generator().manual_seed(5)
    lens = [7, 31, 18]                                          # rows 1, 2, 3 (row 0 unused)
    with torch.inference_mode():
        for r, n in enumerate(lens, start=1):
            ids = torch.randint(0, 320, (1, n), generator=g)
            for m, c in ((ref, rc), (fused, fc)):
                m(ids, c, cache_pos=torch.arange(n)[None], kv_len=n, row0=r)
        toks = [5, 17, 300]
        pos = torch.tensor(lens)[:, None]
        state = ref.sequence_state(torch.tensor([toks]).T)
        want = ref(torch.tensor(toks)[:, None], rc, cache_pos=pos, kv_len=max(lens) + 1, state=state,
                   row0=1)[:, -1]
        got = fd.step(toks, lens, [1, 2, 3])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    for ka, kb in zip(rc.k, fc.k):
        torch.testing.assert_close(ka, kb, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="cache rows"):
        fd.step([1, 2], [3, 4], [3, 4])
    with pytest.raises(ValueError, match="outside the cache"):
        fd.step([1], [96], [0])


def test_why_not_names_the_reason(monkeypatch):
    cfg = ModelConfig(family="chatglm3", vocab_size=64, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=32, ffn_hidden_size=64, max_seq_len=32)
    plain = GLM(cfg).init_weights(seed=0)
    assert "quantized" in why_not(plain, KVCache.for_model(plain, 1, 32)) or "fp32" in why_not(plain)
    q = _model(4)
    assert "cache" in why_not(q, KVCache.for_model(q, 1, 96, dtype=torch.float32))     # not an fp16 cache
    assert why_not(q, KVCache.for_model(q, 1, 96)) is None
    monkeypatch.setenv("GLMKIT_FAST_DECODE", "0")
    assert "GLMKIT_FAST_DECODE" in why_not(q)
    v1 = ModelConfig(family="chatglm", vocab_size=64, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
                     head_dim=32, ffn_hidden_size=128, max_seq_len=32, norm="layernorm", activation="gelu_tanh",
                     qkv_layout="per_head", glm_residual=True, prefix_lm=True, rope_2d=True, rope_dim=16,
                     rope_interleaved=False)
    monkeypatch.delenv("GLMKIT_FAST_DECODE")
    m1 = quantize_model(GLM(v1).init_weights(seed=0), QuantSpec.parse("int4"))
    assert why_not(m1, KVCache.for_model(m1, 1, 32)) is None                # ChatGLM-6B takes the fused path too
    mixed = quantize_model(GLM(v1.replace(activation="swiglu")).init_weights(seed=0), QuantSpec.parse("int4"))
    assert "ChatGLM-6B" in why_not(mixed, KVCache.for_model(mixed, 1, 32))  # a layout it does not know


def _greedy(model, prompt, n):
    eng = Engine(model, max_seq=96)
    return list(eng.generate(prompt, SamplingParams(temperature=0, max_new_tokens=n))), eng


def test_generator_uses_it_and_matches_the_reference(monkeypatch):
    prompt = list(range(3, 40))
    m = _model(4, seed=7)
    fused_tokens, gen = _greedy(m, prompt, 40)
    assert gen.stepper.fast is not None                         # the fused path ran
    monkeypatch.setenv("GLMKIT_FAST_DECODE", "0")
    m2 = _model(4, seed=7)
    ref_tokens, gen2 = _greedy(m2, prompt, 40)
    assert gen2.stepper.fast is None
    assert fused_tokens == ref_tokens


def _engine_tokens(model, prompts, n):
    eng = Engine(model, max_seq=96, slots=4).start()
    outs = []
    try:
        qs = []
        for p in prompts:
            q = queue.Queue()
            eng.submit(Sequence(p, SamplingParams(temperature=0, max_new_tokens=n), [], q.put))
            qs.append(q)
        for q in qs:
            toks = []
            while True:
                ev = q.get(timeout=60)
                if ev[0] == "token":
                    toks.append(ev[1])
                elif ev[0] == "done":
                    break
                else:
                    raise AssertionError(ev)
            outs.append(toks)
    finally:
        eng.shutdown()
    return outs, eng


def test_server_engine_batches_through_it(monkeypatch):
    prompts = [list(range(5, 20)), list(range(40, 80)), [7, 8, 9]]
    got, eng = _engine_tokens(_model(8, seed=11), prompts, 24)
    assert eng.stepper.fast is not None
    monkeypatch.setenv("GLMKIT_FAST_DECODE", "0")
    want, eng2 = _engine_tokens(_model(8, seed=11), prompts, 24)
    assert eng2.stepper.fast is None
    assert got == want and all(len(t) == 24 for t in got)


def test_step_with_a_prompt_chunk_beside_decode_rows():
    """A row taking several consecutive positions in one step (a prompt chunk riding in a decode step) equals
    model.forward of that chunk, and the decoding row beside it its own one-token step."""
    (ref, rc), (fused, fc) = _pair(_model(4), 3, 96)
    fd = FastDecoder(fused, fc)
    g = torch.Generator().manual_seed(9)
    a, b = torch.randint(0, 320, (1, 12), generator=g), torch.randint(0, 320, (1, 20), generator=g)
    with torch.inference_mode():
        for m, c in ((ref, rc), (fused, fc)):
            m(a, c, cache_pos=torch.arange(12)[None], kv_len=12, row0=0)       # row 0 decodes at 12
            m(b[:, :8], c, cache_pos=torch.arange(8)[None], kv_len=8, row0=2)  # row 2 has read 8 tokens
        want_dec = ref(torch.tensor([[7]]), rc, cache_pos=torch.tensor([[12]]), kv_len=13, row0=0)[:, -1]
        want_chunk = ref(b[:, 8:20], rc, cache_pos=torch.arange(8, 20)[None], kv_len=20, row0=2)[0]
        got = fd.step([7] + b[0, 8:20].tolist(), [12] + list(range(8, 20)), [0] + [2] * 12,
                      logits_for=[0, 12])
    torch.testing.assert_close(got[0], want_dec[0], rtol=1e-4, atol=2e-2)     # activation-quantization noise
    torch.testing.assert_close(got[1], want_chunk[-1], rtol=1e-4, atol=2e-2)
    assert (got[1] - want_chunk[-1]).abs().mean() < 2e-3
    for ka, kb in zip(rc.k, fc.k):
        torch.testing.assert_close(ka[2, :, :20].float(), kb[2, :, :20].float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="consecutive"):
        fd.step([1, 2], [30, 32], [1, 1])
