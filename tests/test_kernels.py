"""glmkit.kernels (C extension, INT4/INT8 block-quantized GEMM for small M) against plain torch references."""
import os
import sys
import threading
import time

import pytest
import torch

import glmkit.kernels as gk

pytestmark = pytest.mark.skipif(not gk.available(), reason=f"glmkit kernels unavailable: {gk.reason()}")


# --------------------------------------------------------------------------------------------------------
# references (written here from the format definition, independent of glmkit.quant)
# --------------------------------------------------------------------------------------------------------
def quantize(w: torch.Tensor, bits: int, group: int):
    """Canonical format: ggml Q8_0 / Q4_0 rules per group."""
    N, K = w.shape
    g = w.float().view(N, K // group, group)
    if bits == 8:
        d = g.abs().amax(-1) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = torch.round(g * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).view(N, K)
        return q, d.half()
    m = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)
    d = m / -8
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    u = torch.trunc(g * inv.unsqueeze(-1) + 8.5).clamp(0, 15).to(torch.uint8).view(N, K // 32, 32)
    return (u[:, :, :16] | (u[:, :, 16:] << 4)).reshape(N, K // 2), d.half()


def dequantize(q: torch.Tensor, s: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    N = q.shape[0]
    if bits == 8:
        w = q.double()
    else:
        K = q.shape[1] * 2
        b = q.view(N, K // 32, 16)
        w = torch.cat([b & 15, b >> 4], -1).reshape(N, K).double() - 8
    K = w.shape[1]
    return (w.view(N, K // group, group) * s.double().unsqueeze(-1)).view(N, K)


def quantize_act(x: torch.Tensor) -> torch.Tensor:
    """The kernels' activation rounding (int8 per 32-block, d = amax / 127, nearest-even), dequantized (fp64)."""
    M, K = x.shape
    b = x.float().view(M, K // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))   # (127 / t: 127 * (1/t))
    q = torch.round(b * inv).clamp(-127, 127)
    return (q.double() * (amax / 127).double()).view(M, K)


def check(bits, x, w_q, s, bias, group, y, loose_ref=None):
    W = dequantize(w_q, s, bits, group)
    xq = quantize_act(x)
    ref = xq @ W.T + (0 if bias is None else bias.double())
    # fp32 accumulation: error bound relative to the sum of |terms|
    bound = 2e-6 * (xq.abs() @ W.abs().T) + 1e-6 * (0 if bias is None else bias.double().abs()) + 1e-30
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all()
    assert (err <= bound).all(), f"max err {err.max().item():.3e}, bound there {bound.flatten()[err.argmax()]:.3e}"
    if loose_ref is not None:    # against unquantized activations: activation rounding error only
        ref2 = x.double() @ W.T + (0 if bias is None else bias.double())
        scale = (x.double().abs() @ W.abs().T).max().item() + 1e-30
        assert (y.double() - ref2).abs().max().item() <= 0.02 * scale


@pytest.fixture(autouse=True)
def _restore_threads():
    n = gk.get_num_threads()
    yield
    gk.set_num_threads(n)
    gk._extension().set_impl("auto")


SHAPES = [(32, 32), (96, 32), (4096, 32), (4096, 64), (4096, 128), (256, 128), (192, 64)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K,group", SHAPES)
@pytest.mark.parametrize("N", [1, 7, 33, 100])
def test_random(bits, K, group, N):
    gen = torch.Generator().manual_seed(N * 1000 + K + group + bits)
    w = torch.randn(N, K, generator=gen)
    q, s = quantize(w, bits, group)
    packed = gk.pack(bits, q, s, group)
    assert packed.dtype == torch.uint8 and packed.numel() == gk.packed_nbytes(bits, N, K, group)
    for M in (1, 3, 8):
        x = torch.randn(M, K, generator=gen)
        bias = torch.randn(N, generator=gen) if M != 3 else None
        for threads in (1, 2):
            gk.set_num_threads(threads)
            y = gk.gemm(bits, x, packed, bias, N, K, group)
            assert y.shape == (M, N) and y.dtype == torch.float32
            check(bits, x, q, s, bias, group, y, loose_ref=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 2, 4, 5, 6, 7, 13, 16, 17])
def test_all_tile_sizes(bits, M):
    N, K, group = 24, 128, 64
    gen = torch.Generator().manual_seed(M)
    q, s = quantize(torch.randn(N, K, generator=gen), bits, group)
    x = torch.randn(M, K, generator=gen)
    y = gk.gemm(bits, x, gk.pack(bits, q, s, group), None, N, K, group)
    check(bits, x, q, s, None, group, y)


@pytest.mark.parametrize("bits", [4, 8])
def test_edge_values(bits):
    N, K, group = 19, 256, 64
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(N, K, generator=gen)
    w[0] = 0                                # all-zero row
    w[1, :64] = 0                           # all-zero group
    w[2] *= 1e4                             # large weights (fp16 scales near 100)
    w[3] *= 1e-6                            # tiny weights: fp16 subnormal scales
    w[4] = 1.0                              # constant row
    w[5, ::2] = -3.0                        # values hitting the int4 extremes
    w[6] = torch.where(torch.arange(K) % 3 == 0, 5.0, -5.0)
    q, s = quantize(w, bits, group)
    packed = gk.pack(bits, q, s, group)
    x = torch.randn(6, K, generator=gen)
    x[0] = 0                                # all-zero activations
    x[1] *= 1e15                            # huge activations
    x[2, :32] = 0                           # a zero 32-block
    x[3] = 127.0                            # exact int8 grid
    x[4, ::2] = 1e-30                       # tiny next to normal
    x[5] = -1e-3
    bias = torch.randn(N, generator=gen)
    for impl in ("avx2", "scalar"):
        gk._extension().set_impl(impl)
        y = gk.gemm(bits, x, packed, bias, N, K, group)
        check(bits, x, q, s, bias, group, y)
        assert torch.equal(y[0], bias)              # zero activations: exactly the bias
        assert torch.equal(y[:, 0], bias[0].expand(6))   # zero weights: exactly the bias


@pytest.mark.parametrize("bits", [4, 8])
def test_nonfinite_and_subnormal_activations(bits):
    N, K, group = 8, 64, 32
    q, s = quantize(torch.randn(N, K), bits, group)
    packed = gk.pack(bits, q, s, group)
    bias = torch.randn(N)
    x = torch.randn(3, K)
    x[0, 5] = float("nan")
    x[1, :32] = 1e-40                       # subnormal block: its contribution is dropped (it is ~1e-40)
    x[2] = 0
    x[2, 40] = 1e-41
    for impl in ("avx2", "scalar"):
        gk._extension().set_impl(impl)
        y = gk.gemm(bits, x, packed, bias, N, K, group)
        assert torch.isnan(y[0]).all()              # NaN propagates as in F.linear
        ref1 = quantize_act(x[1:2, 32:]) @ dequantize(q, s, bits, group)[:, 32:].T + bias.double()
        torch.testing.assert_close(y[1].double(), ref1[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(y[2], bias)


@pytest.mark.parametrize("bits", [4, 8])
def test_extreme_codes(bits):
    """Every weight code at the end of its range (q8: +-127 and -128; q4: 0 and 15), int8 extremes in x."""
    N, K, group = 16, 4096, 32
    if bits == 8:
        q = torch.full((N, K), 127, dtype=torch.int8)
        q[1::2] = -127
        q[2] = -128                      # not produced by the quantizer, but must not overflow either
    else:
        q = torch.full((N, K // 2), 0xFF, dtype=torch.uint8)
        q[1::2] = 0x00
    s = torch.full((N, K // group), 0.5, dtype=torch.float16)
    x = torch.ones(2, K)
    x[1, 1::2] = -1
    y = gk.gemm(bits, x, gk.pack(bits, q, s, group), None, N, K, group)
    check(bits, x, q, s, None, group, y)


def test_scalar_path_matches():
    N, K, group = 45, 384, 128
    gen = torch.Generator().manual_seed(3)
    for bits in (4, 8):
        q, s = quantize(torch.randn(N, K, generator=gen), bits, group)
        packed = gk.pack(bits, q, s, group)
        x = torch.randn(5, K, generator=gen)
        ya = gk.gemm(bits, x, packed, None, N, K, group)
        gk._extension().set_impl("scalar")
        ys = gk.gemm(bits, x, packed, None, N, K, group)
        gk._extension().set_impl("auto")
        check(bits, x, q, s, None, group, ys)
        torch.testing.assert_close(ya, ys, rtol=1e-5, atol=1e-5)


def test_pack_layout_and_out():
    N, K, group = 10, 64, 32
    q = torch.arange(N * K // 2, dtype=torch.int64).remainder(256).to(torch.uint8).view(N, K // 2)
    s = torch.arange(N * 2, dtype=torch.float16).view(N, 2)
    p = gk.pack(4, q, s, group)
    assert p.numel() == 16 * K // 2 + 16 * 2 * 2
    # block tile (panel 0, block 1): chunk j, lane r, byte i = canonical byte 16 + 4j + i of row r
    t = p[128:256].view(4, 8, 4)
    for j in range(4):
        for r in range(8):
            assert t[j, r].tolist() == q[r, 16 + 4 * j:16 + 4 * j + 4].tolist()
    sc = p[16 * K // 2:].view(torch.float16).view(2, 2, 8)          # [panel, group, row]
    assert torch.equal(sc[0, 1], s[:8, 1])
    assert torch.equal(sc[1, 0, :2], s[8:, 0]) and (sc[1, :, 2:] == 0).all()
    out = torch.empty_like(p)
    assert gk.pack("q4", q, s, group, out=out) is out and torch.equal(out, p)
    x = torch.randn(2, K)
    y = torch.empty(2, N)
    assert gk.gemm("int4", x, p, None, N, K, group, out=y) is y


def test_errors():
    q, s = quantize(torch.randn(8, 64), 8, 32)
    p = gk.pack(8, q, s, 32)
    x = torch.randn(1, 64)
    with pytest.raises(gk.KernelError, match="kind"):
        gk.gemm(5, x, p, None, 8, 64, 32)
    with pytest.raises(gk.KernelError, match="int8 qweight"):
        gk.pack(8, q.view(torch.uint8), s, 32)
    with pytest.raises(gk.KernelError, match="scales must be float16"):
        gk.pack(8, q, s.float(), 32)
    with pytest.raises(gk.KernelError, match="scales of shape"):
        gk.pack(8, q, s, 64)
    with pytest.raises(gk.KernelError, match="multiple of 32"):
        gk.pack(8, q[:, :48], s[:, :1], 48)
    with pytest.raises(gk.KernelError, match="float32"):
        gk.gemm(8, x.double(), p, None, 8, 64, 32)
    with pytest.raises(gk.KernelError, match="contiguous"):
        gk.gemm(8, torch.randn(64, 2).t(), p, None, 8, 64, 32)
    with pytest.raises(gk.KernelError, match=r"\[M, 64\]"):
        gk.gemm(8, torch.randn(1, 32), p, None, 8, 64, 32)
    with pytest.raises(gk.KernelError, match="packed"):
        gk.gemm(8, x, p[:-2], None, 8, 64, 32)
    with pytest.raises(gk.KernelError, match="packed"):
        gk.gemm(4, x, p, None, 8, 64, 32)       # a q8 buffer passed as q4: wrong size
    with pytest.raises(gk.KernelError, match="bias"):
        gk.gemm(8, x, p, torch.randn(7), 8, 64, 32)
    with pytest.raises(gk.KernelError, match="out"):
        gk.gemm(8, x, p, None, 8, 64, 32, out=torch.empty(1, 9))
    assert gk.gemm(8, torch.empty(0, 64), p, None, 8, 64, 32).shape == (0, 8)


def test_threads_and_features():
    f = gk.cpu_features()
    assert f["avx2"] and f["impl"] == "avx2"
    gk.set_num_threads(3)
    assert gk.get_num_threads() == 3
    gk.set_spin_us(0)            # workers sleep at once: exercises the futex/condvar wake-up path
    try:
        N, K = 300, 512
        q, s = quantize(torch.randn(N, K), 4, 32)
        p = gk.pack(4, q, s, 32)
        x = torch.randn(2, K)
        y0 = gk.gemm(4, x, p, None, N, K, 32)
        for n in (1, 2, 4):
            gk.set_num_threads(n)
            for _ in range(20):
                assert torch.equal(gk.gemm(4, x, p, None, N, K, 32), y0)
                time.sleep(0.0002)
    finally:
        gk.set_spin_us(50)


def test_concurrent_callers():
    N, K = 200, 1024
    gen = torch.Generator().manual_seed(11)
    q, s = quantize(torch.randn(N, K, generator=gen), 8, 64)
    p = gk.pack(8, q, s, 64)
    xs = [torch.randn(2, K, generator=gen) for _ in range(4)]
    want = [gk.gemm(8, x, p, None, N, K, 64) for x in xs]
    bad = []

    def run(i):
        for _ in range(50):
            if not torch.equal(gk.gemm(8, xs[i], p, None, N, K, 64), want[i]):
                bad.append(i)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not bad and not any(t.is_alive() for t in ts)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork()")
def test_fork_after_use():
    """The pool's threads do not survive fork(); the child must start a fresh pool, not hang."""
    N, K = 64, 256
    q, s = quantize(torch.randn(N, K), 4, 32)
    p = gk.pack(4, q, s, 32)
    x = torch.randn(1, K)
    gk.set_num_threads(2)
    want = gk.gemm(4, x, p, None, N, K, 32)
    pid = os.fork()
    if pid == 0:      # child
        ok = False
        try:
            ok = torch.equal(gk.gemm(4, x, p, None, N, K, 32), want)
        finally:
            os._exit(0 if ok else 1)
    deadline = time.time() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("child hung in gemm after fork")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


def test_every_prefetch_hint_and_distance_gives_the_same_result():
    """The weight stream's software prefetch (hint per CPU: nta on AMD, t0 on Intel; distance in bytes) moves
    no value: INT4, INT8 and bf16 decode GEMVs bit for bit equal under each of the four hints and no prefetch."""
    ext = gk._extension()
    f = gk.cpu_features()
    assert f["prefetch_hint"] in ("nta", "t0", "t1", "t2") and f["prefetch"] > 0
    default = (["nta", "t0", "t1", "t2"].index(f["prefetch_hint"]), f["prefetch"])
    g = torch.Generator().manual_seed(11)
    N, K = 200, 512
    w = torch.randn(N, K, generator=g)
    x = torch.randn(1, K, generator=g)
    cases = [(bits, gk.pack(bits, *quantize(w, bits, 32), 32), 32) for bits in (4, 8)]
    cases.append((17, gk.pack_float(w.bfloat16()), 0))
    try:
        for kind, packed, group in cases:
            want = gk.gemm(kind, x, packed, None, N, K, group)
            for hint in range(4):
                for dist in (0, 640, 3072, 8192):
                    ext._tune("pfhint", hint)
                    ext._tune("prefetch", dist)
                    assert torch.equal(gk.gemm(kind, x, packed, None, N, K, group), want), (kind, hint, dist)
    finally:
        ext._tune("pfhint", default[0])
        ext._tune("prefetch", default[1])
    assert gk.cpu_features()["prefetch_hint"] == f["prefetch_hint"]
