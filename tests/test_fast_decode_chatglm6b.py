"""ChatGLM-6B on the fused decode path (LayerNorm with the alpha residual, per-head qkv, 2D rotary, GELU, the
prefix LM's bidirectional context) against model.forward, and the C ops it adds against torch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import REF, needs_kernels, needs_shared
from glmkit.config import ModelConfig
from glmkit.engine import Engine, KVCache
from glmkit.engine.fast_decode import FastDecoder, why_not
from glmkit.model import GLM
from glmkit.quant import QuantSpec, prepare_model, quantize_model
from glmkit.sampling import SamplingParams

pytestmark = needs_kernels

GMASK, SOP = 130001, 130004


@pytest.fixture(params=["avx2", "scalar"])
def impl(request):
    from glmkit import kernels
    ext = kernels._extension()
    ext.set_impl(request.param)
    yield ext
    ext.set_impl("auto")


@pytest.mark.parametrize("n", [4096, 37])
@pytest.mark.parametrize("alpha", [0.0, 7.483])
def test_layernorm_with_residual_and_alpha(impl, n, alpha):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g) * 3 + 1
    res = torch.randn(3, n, generator=g)
    w, b = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.1
    out = torch.empty(3, n)
    x1 = x.clone()
    impl.layernorm(x1.data_ptr(), res.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), 3, n, 1e-5, alpha)
    ref = F.layer_norm(x + res, (n,), w, b, 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if alpha:                                   # the residual stream now carries alpha * LN(x)
        torch.testing.assert_close(x1, ref * alpha, rtol=1e-5, atol=1e-4)
    else:
        assert torch.equal(x1, x + res)
    x2 = x.clone()
    impl.layernorm(x2.data_ptr(), 0, w.data_ptr(), b.data_ptr(), out.data_ptr(), 3, n, 1e-5, 0.0)
    assert torch.equal(x2, x)
    torch.testing.assert_close(out, F.layer_norm(x, (n,), w, b, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("F_", [16384, 29])
def test_gelu_tanh(impl, F_):
    g = torch.Generator().manual_seed(F_)
    h = torch.randn(2, F_, generator=g) * 4
    h[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -9.0])          # saturating on both sides
    out = torch.empty(2, F_)
    impl.gelu(h.data_ptr(), out.data_ptr(), 2, F_)
    torch.testing.assert_close(out, F.gelu(h, approximate="tanh"), rtol=2e-6, atol=2e-7)


def test_attend_per_head_2d_rotary_bidirectional(impl):
    """attend_ex on ChatGLM-6B's per-head [q, k, v] rows with 2D rotary: a context of 6 tokens written (mode 1)
    then attended whole (mode 2), against torch (apply_rope on each half, fp16 cache, SDPA without a mask)."""
    from glmkit.model import apply_rope
    H, D, R, n, S = 4, 32, 16, 6, 16
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, H, 3, D, generator=g)
    ang = torch.rand(2, n, R // 2, generator=g) * 6                  # per token: position and block streams
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    kc, vc = torch.zeros(H, S, D, dtype=torch.float16), torch.zeros(H, S, D, dtype=torch.float16)
    y = torch.empty(n, H * D)
    work = qkv.clone()
    for mode in (1, 2):
        for t in range(n):
            q = work[t].data_ptr()
            c1, s1 = cos[0, t].data_ptr(), sin[0, t].data_ptr()
            c2, s2 = cos[1, t].data_ptr(), sin[1, t].data_ptr()
            impl.attend_ex(q, q + 4 * D, q + 8 * D, c1, s1, c2, s2, kc.data_ptr(), vc.data_ptr(), 0, 0,
                           y[t].data_ptr(), H, H, D, R, 0, 3 * D, 3 * D, t, n, S * D, mode)

    def rot(x):                                                        # x [n, H, D]
        a = apply_rope(x[..., :R], cos[0][:, None], sin[0][:, None], False)
        b = apply_rope(x[..., R:2 * R], cos[1][:, None], sin[1][:, None], False)
        return torch.cat((a, b, x[..., 2 * R:]), -1)
    q, k, v = rot(qkv[:, :, 0]), rot(qkv[:, :, 1]), qkv[:, :, 2]
    assert torch.equal(kc[:, :n], k.transpose(0, 1).half()) and torch.equal(vc[:, :n], v.transpose(0, 1).half())
    want = F.scaled_dot_product_attention(q.transpose(0, 1), kc[:, :n].float(), vc[:, :n].float())
    torch.testing.assert_close(y, want.transpose(0, 1).reshape(n, H * D), rtol=1e-5, atol=1e-6)


# --- the step against model.forward -------------------------------------------------------------------------

def _v1(bits=4, seed=1, D=64, layers=3, max_seq=96):
    cfg = ModelConfig(family="chatglm", vocab_size=320, hidden_size=256, num_layers=layers,
                      num_heads=256 // D, num_kv_heads=256 // D, head_dim=D, ffn_hidden_size=1024,
                      max_seq_len=max_seq, norm="layernorm", activation="gelu_tanh", qkv_layout="per_head",
                      qkv_bias=True, out_bias=True, mlp_bias=True, glm_residual=True, alpha_layers=28,
                      prefix_lm=True, rope_2d=True, rope_dim=D // 2, rope_interleaved=False, rope_fp16_freqs=True,
                      mask_token_id=300, gmask_token_id=301, sop_token_id=302, eos_token_id=303)
    m = GLM(cfg).init_weights(std=0.05, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:                                      # norms not all ones, biases not all zero
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    quantize_model(m, QuantSpec.parse(f"int{bits}"))
    prepare_model(m)
    return m


def _prompt(n_ctx, seed=3):
    ids = torch.randint(0, 300, (n_ctx,), generator=torch.Generator().manual_seed(seed)).tolist()
    ids[n_ctx // 2] = 301                                         # [gMASK] inside the context
    return ids + [302]                                            # <sop>: the context ends before it


@pytest.mark.parametrize("bits,D", [(4, 64), (8, 32)])
def test_v1_context_then_decode_equals_forward(bits, D):
    """The whole prompt (bidirectional context + <sop>) in one fused step, then 12 decode steps with the 2D
    positions of generated tokens, each against model.forward from the same cache contents."""
    ref = _v1(bits, D=D)
    fused = copy.deepcopy(ref)
    prepare_model(fused)
    rc, fc = KVCache.for_model(ref, 1, 96), KVCache.for_model(fused, 1, 96)
    assert why_not(fused, fc) is None
    fd = FastDecoder(fused, fc)
    ids = _prompt(20)
    n = len(ids)
    state = ref.sequence_state(torch.tensor([ids]))
    ctx, mpos = int(state.ctx_len[0]), int(state.mask_pos[0])
    assert ctx == n - 1 and mpos == 10
    with torch.inference_mode():
        want = ref(torch.tensor([ids]), rc, cache_pos=torch.arange(n)[None], kv_len=n, state=state)[0]
        got = fd.step(ids, list(range(n)), [0] * n, logits_for=[0, n // 2, n - 1], ctx=[ctx] * n,
                      mask_pos=[mpos] * n)
        # activation quantization in the GEMMs (int8 per block): a last-bit difference can flip one rounding
        torch.testing.assert_close(got, want[[0, n // 2, n - 1]], rtol=1e-3, atol=2e-2)
        assert (got - want[[0, n // 2, n - 1]]).abs().mean() < 2e-3
        for ka, kb in zip(rc.k, fc.k):
            torch.testing.assert_close(ka[0, :, :n].float(), kb[0, :, :n].float(), rtol=1e-2, atol=1e-2)
        errs = []
        tok = int(want[-1].argmax())
        for p in range(n, n + 12):
            for ka, kb, va, vb in zip(rc.k, fc.k, rc.v, fc.v):
                kb.copy_(ka)
                vb.copy_(va)
            w = ref(torch.tensor([[tok]]), rc, cache_pos=torch.tensor([[p]]), kv_len=p + 1, state=state)[0, -1]
            g = fd.step([tok], [p], [0], ctx=[ctx], mask_pos=[mpos])[0]
            errs.append((g - w).abs().max().item())
            tok = int(w.argmax())
    assert sum(e < 2e-5 for e in errs) >= 10 and max(errs) < 0.1, errs


def test_v1_rejects_a_context_cut_in_two():
    m = _v1(4)
    fd = FastDecoder(m, KVCache.for_model(m, 1, 96))
    with pytest.raises(ValueError, match="bidirectional context"):
        fd.step([1, 2, 3], [0, 1, 2], [0, 0, 0], ctx=[10] * 3, mask_pos=[1] * 3)


def _engine_tokens(model, prompt, n, chunk):
    eng = Engine(model, max_seq=96, prefill_chunk=chunk)
    return list(eng.generate(prompt, SamplingParams(temperature=0, max_new_tokens=n), stop_ids=())), eng


@pytest.mark.parametrize("chunk", [64, 8])
def test_v1_engine_greedy_equals_reference_path(monkeypatch, chunk):
    """Greedy tokens with the fused path (context read in the fused step when it fits a chunk, else a layer
    range at a time through model.forward) equal those of model.forward alone."""
    prompt = _prompt(30, seed=8)
    got, eng = _engine_tokens(_v1(4, seed=5), prompt, 24, chunk)
    assert eng.stepper.fast is not None and eng.stepper.fast.v1
    monkeypatch.setenv("GLMKIT_FAST_DECODE", "0")
    want, eng2 = _engine_tokens(_v1(4, seed=5), prompt, 24, chunk)
    assert eng2.stepper.fast is None
    assert got == want


@needs_shared
@pytest.mark.parametrize("spec", ["int4", "int8"])
def test_reference_chatglm6b_quantized_fused_equals_forward(monkeypatch, spec):
    """The official-layout tiny ChatGLM-6B (../shared reference checkpoint: alpha from 28 layers, fp16 inverse
    frequencies), quantized: greedy tokens on the fused path equal model.forward's."""
    from glmkit.checkpoint import load_model
    prompt = [5, 64, 1000, 300, 77, 9, GMASK, SOP]
    outs = []
    for fast in ("1", "0"):
        monkeypatch.setenv("GLMKIT_FAST_DECODE", fast)
        model, _ = load_model(REF / "chatglm-6b", quantize=spec)
        prepare_model(model)
        toks, eng = _engine_tokens(model, prompt, 16, 32)
        assert (eng.stepper.fast is not None) == (fast == "1"), eng.decode_path
        outs.append(toks)
    assert outs[0] == outs[1]
