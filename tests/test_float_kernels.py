"""The float weight kinds of glmkit.kernels (fp16 / bf16 weights, fp32 arithmetic), glmkit/float_kernels.py, the
fused decode step on float models, and the kernels' run-time ISA selection: every variant this CPU can run
(and the AVX-512 code paths with their AVX-512-only instructions emulated on AVX2) against plain torch
references and model.forward."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import needs_kernels
from glmkit.config import ModelConfig
from glmkit.engine import Engine, KVCache
from glmkit.engine.fast_decode import FastDecoder, why_not
from glmkit.model import GLM
from glmkit.sampling import SamplingParams

pytestmark = needs_kernels

import glmkit.kernels as gk  # noqa: E402
from glmkit.float_kernels import FloatEmbedding, FloatLinear, prepare_float  # noqa: E402
from glmkit.quant import prepare_model, quantize_tensor  # noqa: E402


def _runnable_isas():
    best = gk.cpu_features()["isa_best"]
    order = ["scalar", "avx2", "avx512"]
    return order[:order.index(best) + 1] + ["avx512-emulated"]


ISAS = _runnable_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    gk.set_isa(request.param)
    yield request.param
    gk.set_isa("auto")


@pytest.fixture(autouse=True)
def _restore():
    n = gk.get_num_threads()
    yield
    gk.set_num_threads(n)
    gk.set_isa("auto")


def _check(x, w, bias, y):
    """fp32 accumulation of exact fp32 products: error bounded relative to the sum of |terms| (fp64 reference)."""
    ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
    bound = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6 * (0 if bias is None else bias.double().abs())
    err = (y.double() - ref).abs()
    assert (err <= bound + 1e-30).all(), f"max err {err.max().item():.3e}"


# --- the kernel ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(1, 1), (16, 64), (17, 7), (45, 300), (64, 600), (100, 520)])
def test_gemm_every_tile_size(isa, dtype, N, K):
    """M 1-4: the decode kernel (each tile size); 5-40: the blocked one (every register-tile split; K 600
    crosses two 256-k blocks); 133 and 300: more than one 128-row block; N 100: panels in more than one group
    of four, the last one short; rows past N % 16; with and without bias; 1 and 2 threads."""
    g = torch.Generator().manual_seed(N * 7 + K)
    w = torch.randn(N, K, generator=g).to(dtype)
    p = gk.pack_float(w)
    assert p.numel() == gk.packed_nbytes(gk.FLOAT_KINDS[dtype], N, K)
    for M in (1, 2, 3, 4, 5, 6, 7, 11, 13, 32, 40, 133, 300):
        x = torch.randn(M, K, generator=g)
        bias = torch.randn(N, generator=g) if M % 2 else None
        for threads in (1, 2) if M in (1, 13) else (2,):
            gk.set_num_threads(threads)
            y = gk.gemm(gk.FLOAT_KINDS[dtype], x, p, bias, N, K, 0)
            assert y.shape == (M, N)
            _check(x, w, bias, y)


def test_pack_roundtrip_layout_and_edge_values(isa):
    N, K = 33, 40
    w = torch.randn(N, K).half()
    w[0] = 0
    w[1, 3] = float("inf")
    w[2, :] = torch.tensor(6e-8).half()                      # fp16 subnormals
    p = gk.pack_float(w)
    assert torch.equal(gk.unpack_float(gk.F16, p, N, K), w)
    # the documented layout: element (p, k, r) at (p * K + k) * 16 + r
    h = p.view(torch.float16)
    assert torch.equal(h[(0 * K + 9) * 16 + 4], w[4, 9]) and torch.equal(h[(2 * K + 5) * 16 + 0], w[32, 5])
    assert h[(2 * K + 5) * 16 + 1] == 0                        # rows past N are zero
    x = torch.randn(3, K)
    bias = torch.randn(N)
    y = gk.gemm(gk.F16, x, p, bias, N, K, 0)
    assert torch.equal(y[:, 0], bias[0].expand(3))            # zero weights: exactly the bias
    assert not torch.isfinite(y[:, 1]).all()                  # inf weight reaches the output
    _check(x, w[2:], bias[2:], y[:, 2:])
    x[1, 0] = float("nan")
    assert torch.isnan(gk.gemm(gk.F16, x, p, None, N, K, 0)[1]).all()
    b = torch.randn(N, K).bfloat16()
    assert torch.equal(gk.unpack_float("bf16", gk.pack_float(b), N, K), b)


def test_errors():
    with pytest.raises(gk.KernelError, match="float16 or bfloat16"):
        gk.pack_float(torch.zeros(4, 4))
    p = gk.pack_float(torch.zeros(16, 8, dtype=torch.bfloat16))
    with pytest.raises(gk.KernelError, match="bf16 weight"):
        gk.gemm(gk.BF16, torch.zeros(1, 8), p[:-2], None, 16, 8, 0)
    with pytest.raises(gk.KernelError, match="contiguous CPU float32"):
        gk.gemm(gk.BF16, torch.zeros(1, 8, dtype=torch.float64), p, None, 16, 8, 0)
    with pytest.raises(gk.KernelError, match="not a float kind"):
        gk.unpack_float(4, p, 16, 8)
    with pytest.raises(gk.KernelError, match="set_isa"):
        gk.set_isa("avx9000")


# --- INT4 / INT8 on every variant ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_gemm_on_every_variant(bits):
    """The VNNI kernels (real on AVX-512 machines, emulated elsewhere) equal the AVX2 ones bit for bit (the same
    integer sums and fp32 operations); the scalar path agrees to float precision."""
    g = torch.Generator().manual_seed(bits)
    for N, K, group in ((33, 256, 32), (100, 512, 128), (8, 64, 64)):
        q, s = quantize_tensor(torch.randn(N, K, generator=g), bits, group)
        p = gk.pack(bits, q, s, group)
        for M in (1, 2, 3, 5, 6, 7, 9):
            x = torch.randn(M, K, generator=g)
            bias = torch.randn(N, generator=g)
            ys = {}
            for name in ISAS:
                gk.set_isa(name)
                ys[name] = gk.gemm(bits, x, p, bias, N, K, group)
            for name in ISAS:
                if name != "scalar":
                    assert torch.equal(ys[name], ys["avx2"]), (name, N, K, M)
            torch.testing.assert_close(ys["scalar"], ys["avx2"], rtol=1e-5, atol=1e-4)


# --- ISA selection ---------------------------------------------------------------------------------------------

def _ext_in_subprocess(env_value: str) -> dict:
    """cpu_features() of a fresh extension import under GLMKIT_KERNEL_ISA=env_value (no torch: fast)."""
    path = gk._extension().__file__
    code = ("import importlib.machinery as m, importlib.util as u, json, sys;"
            "l = m.ExtensionFileLoader('glmkit.kernels._qgemm', sys.argv[1]);"
            "s = u.spec_from_loader(l.name, l); e = u.module_from_spec(s); l.exec_module(e);"
            "print(json.dumps(e.cpu_features()))")
    env = dict(os.environ, GLMKIT_KERNEL_ISA=env_value)
    out = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_cpu_features_and_the_env_cap():
    f = gk.cpu_features()
    for key in ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16", "avx512fp16", "os_ymm", "os_zmm"):
        assert isinstance(f[key], bool)
    assert f["isa"] == gk.isa() and f["isa"] in gk.ISAS
    avx512_ok = f["avx512f"] and f["avx512bw"] and f["avx512vl"] and f["avx512vnni"] and f["os_zmm"]
    assert f["isa_best"] == ("avx512" if avx512_ok else "avx2")   # (the kernels run: AVX2 at least)
    assert _ext_in_subprocess("scalar")["isa"] == "scalar"
    assert _ext_in_subprocess("avx2")["isa"] == "avx2"
    assert _ext_in_subprocess("avx512")["isa"] == f["isa_best"]      # a cap, never above the machine
    bad = _ext_in_subprocess("sse9")
    assert "GLMKIT_KERNEL_ISA=sse9" in bad["isa_env_error"]
    if not avx512_ok:
        with pytest.raises(gk.KernelError, match="AVX-512"):
            gk.set_isa("avx512")


def test_unknown_isa_in_env_makes_the_kernels_unavailable_with_the_reason(monkeypatch):
    ext = gk._extension()
    bad = dict(ext.cpu_features(), isa_env_error="GLMKIT_KERNEL_ISA=avx3 is not one of auto, avx512, avx2, scalar")
    monkeypatch.setattr(ext, "cpu_features", lambda: bad)
    monkeypatch.setattr(gk, "_state", None)
    assert not gk.available() and "GLMKIT_KERNEL_ISA=avx3" in gk.reason()
    monkeypatch.undo()
    gk._state = None
    assert gk.available()


# --- FloatLinear / prepare_float --------------------------------------------------------------------------------

def test_float_linear_is_the_linear_it_replaces():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(48, 37).bfloat16()
    with torch.no_grad():
        lin.bias.copy_(torch.randn(37, generator=g))
    fl = FloatLinear.from_linear(lin)
    x = torch.randn(2, 5, 48, generator=g)
    want = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    torch.testing.assert_close(fl(x).double(), want, rtol=1e-5, atol=1e-5)
    assert fl(x.bfloat16()).dtype == torch.bfloat16            # output in the input's dtype
    sd = fl.state_dict()
    assert sd["weight"].dtype == torch.bfloat16 and torch.equal(sd["weight"], lin.weight)
    assert torch.equal(sd["bias"], lin.bias)
    other = FloatLinear(torch.zeros(37, 48, dtype=torch.bfloat16), torch.zeros(37))
    other.load_state_dict(sd)
    assert torch.equal(other(x), fl(x))
    xg = x.clone().requires_grad_()
    fl(xg).sum().backward()                                    # frozen weight, gradient to the input
    torch.testing.assert_close(xg.grad, lin.weight.float().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def _cfg(**kw):
    base = dict(family="chatglm3", vocab_size=320, hidden_size=256, num_layers=3, num_heads=8, num_kv_heads=2,
                head_dim=32, ffn_hidden_size=352, max_seq_len=96, rope_interleaved=True, qkv_bias=True)
    base.update(kw)
    return ModelConfig(**base)


def _float_pair(dtype, seed=1, **kw):
    """(a model in `dtype` prepared for the kernels, the same weights in fp32 on the PyTorch path)."""
    m = GLM(_cfg(**kw)).init_weights(std=0.05, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    m = m.to(dtype)
    ref = copy.deepcopy(m).float()
    assert prepare_model(m, own_threads=False) == 3 * 4 + 1    # every Linear, the head included
    return m, ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prepared_model_forward_equals_fp32_reference(dtype):
    m, ref = _float_pair(dtype)
    assert m.dtype == torch.float32                            # activations
    assert isinstance(m.tok_embeddings, FloatEmbedding) and m.tok_embeddings.weight.dtype == dtype
    assert isinstance(m.layers[0].mlp.up, FloatLinear) and m.layers[0].mlp.up.weight.dtype == dtype
    assert m.layers[0].attn_norm.weight.dtype == torch.float32
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(m(ids), ref(ids), rtol=1e-5, atol=2e-5)
    sd = m.state_dict()                                        # saved as the checkpoint had it
    assert sd["layers.0.attn.qkv.weight"].dtype == dtype and sd["tok_embeddings.weight"].dtype == dtype
    assert KVCache.for_model(m, 1, 32).dtype == torch.float16


def test_prepare_float_leaves_other_models_alone():
    fp32 = GLM(_cfg()).init_weights(seed=0)
    assert prepare_float(fp32) == 0 and type(fp32.layers[0].attn.qkv) is nn.Linear
    from glmkit.adapters.lora import apply_lora
    lora = GLM(_cfg()).init_weights(seed=0).to(torch.bfloat16)
    apply_lora(lora, rank=2)
    assert prepare_float(lora) == 0                            # LoRA wraps nn.Linear: left as it is


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_step_on_a_float_model_equals_forward(isa, dtype):
    if isa == "scalar" and dtype == torch.float16:
        pytest.skip("the scalar path is held by the bf16 case and the kernel tests")
    """The fused decode step (fast_decode.py) runs float models: each step from the same cache contents as the
    fp32 reference model's forward, logits and the keys/values written agree to float precision."""
    m, ref = _float_pair(dtype, seed=3, rope_interleaved=dtype == torch.bfloat16)
    fc = KVCache.for_model(m, 2, 64)
    rc = KVCache.for_model(ref, 2, 64, dtype=torch.float16)
    assert why_not(m, fc) is None
    fd = FastDecoder(m, fc)
    ids = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref(ids[:, :20], rc, cache_pos=torch.arange(20)[None], kv_len=20, row0=1)
        for p in range(20, 26):
            for ka, kb, va, vb in zip(rc.k, fc.k, rc.v, fc.v):
                kb.copy_(ka)
                vb.copy_(va)
            want = ref(ids[:, p:p + 1], rc, cache_pos=torch.tensor([[p]]), kv_len=p + 1, row0=1)[:, -1]
            got = fd.step([int(ids[0, p])], [p], [1])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            for ka, kb in zip(rc.k, fc.k):
                torch.testing.assert_close(kb[1, :, p].float(), ka[1, :, p].float(), rtol=2e-3, atol=1e-3)
        # a prompt chunk riding beside a decode row (the engine's prefill on the fused path)
        for ka, kb, va, vb in zip(rc.k, fc.k, rc.v, fc.v):
            kb.copy_(ka)
            vb.copy_(va)
        got = fd.step([5] + ids[0, :8].tolist(), [26] + list(range(8)), [1] + [0] * 8, logits_for=[0, 8])
        want_dec = ref(torch.tensor([[5]]), rc, cache_pos=torch.tensor([[26]]), kv_len=27, row0=1)[0, -1]
        want_chunk = ref(ids[:, :8], rc, cache_pos=torch.arange(8)[None], kv_len=8, row0=0)[0, -1]
    torch.testing.assert_close(got[0], want_dec, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want_chunk, rtol=1e-4, atol=1e-4)


def test_engine_runs_float_models_fused_with_the_reference_tokens(monkeypatch):
    prompt = list(range(3, 40))
    m, ref = _float_pair(torch.bfloat16, seed=7)
    eng = Engine(m, max_seq=96)
    assert eng.decode_path == "fused"
    fused = list(eng.generate(prompt, SamplingParams(temperature=0, max_new_tokens=24)))
    monkeypatch.setenv("GLMKIT_FAST_DECODE", "0")
    eng2 = Engine(ref, max_seq=96)
    assert eng2.decode_path.startswith("model.forward")
    assert fused == list(eng2.generate(prompt, SamplingParams(temperature=0, max_new_tokens=24)))


def test_pipeline_load_puts_a_bf16_model_on_the_kernels(tmp_path):
    from glmkit import load
    from glmkit.checkpoint import save_model
    from glmkit.models import embedded_model_path
    src = embedded_model_path()
    if src is None:
        pytest.skip("this install carries no glm-tiny")
    pipe = load(src, dtype="bfloat16")
    m = pipe.model
    assert isinstance(m.layers[0].attn.qkv, FloatLinear) and m.layers[0].attn.qkv.weight.dtype == torch.bfloat16
    ref = load(src, dtype="float32").model
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = copy.deepcopy(ref).to(torch.bfloat16).float()(ids)   # the same bf16-rounded weights, in fp32
        torch.testing.assert_close(m(ids), want, rtol=1e-4, atol=1e-4)
    save_model(m, tmp_path / "again", source_dir=src)          # saving a prepared model: bf16 weights again
    again = load(tmp_path / "again", dtype="bfloat16").model
    with torch.inference_mode():
        torch.testing.assert_close(again(ids), m(ids), rtol=0, atol=0)

