"""Decode-sized (M=1) quantized GEMV speed of glmkit.kernels on the ChatGLM3-6B layer shapes.

    python benchmarks/kernel_gemv.py [--threads 2] [--kinds q4 q8] [--group 32] [--no-model] [--reps 3]
    python benchmarks/kernel_gemv.py --sweep-prefetch --kinds q4

Reports, next to each other (measured in the same process, interleaved):
  * read bandwidth: the extension's own streaming-read loop (stream_read: AVX2 loads, the pool's threads,
    contiguous ranges) over a 1 GiB buffer, best of several;
  * per layer shape: time per call and GB/s of weight bytes (packed quants + scales) streamed, with enough
    distinct copies of the weight that the last-level cache cannot serve it, and % of the read bandwidth;
  * torch fp32 F.linear on the dequantized weight (same threads), for reference;
  * "whole model": the 28 layers' 4 matrices (distinct buffers) + the output layer, called in decode order,
    as tokens/s of the linear part alone (an upper bound for end-to-end decode).
--sweep-prefetch runs only the whole model, under each software-prefetch hint and distance (the kernels pick
one per CPU vendor: cpu_features()['prefetch_hint'], ['prefetch']), to re-check that choice on a new CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import glmkit.kernels as gk

SHAPES = [("qkv", 4608, 4096), ("dense", 4096, 4096), ("up", 27392, 4096), ("down", 4096, 13696),
          ("output", 65024, 4096)]
LAYERS = 28
KIND = {"q4": 4, "q8": 8}


def canonical(kind: int, N: int, K: int, group: int, gen: torch.Generator):
    """Random canonical weights (values do not matter for speed; scales are ordinary fp16 numbers)."""
    if kind == 4:
        q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    else:
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    s = (torch.rand((N, K // group), generator=gen) * 0.01 + 0.001).half()
    return q, s


def dequant(kind: int, q, s, group: int):
    N = q.shape[0]
    if kind == 8:
        w = q.float()
    else:
        K = q.shape[1] * 2
        b = q.view(N, K // 32, 16)
        w = torch.cat([b & 15, b >> 4], -1).reshape(N, K).float() - 8
    K = w.shape[1]
    return (w.view(N, K // group, group) * s.float().unsqueeze(-1)).view(N, K)


def read_bw(buf: torch.Tensor, reps: int = 5) -> float:
    gk.stream_read(buf)
    return max(buf.numel() / gk.stream_read(buf) for _ in range(reps)) / 1e9


def time_calls(fn, n: int) -> float:
    """Median seconds per call over n calls (after a warm-up)."""
    fn(0)
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def whole_model(kind: int, group: int, m: int, gen: torch.Generator):
    """The 28 layers' 4 matrices (distinct buffers) + the output layer, and a function that runs them in decode
    order (one token). Returns (token_fn, bytes of weights)."""
    canon = {name: canonical(kind, N, K, group, gen) for name, N, K in SHAPES}
    model = [(gk.pack(kind, *canon[name], group), N, K) for _ in range(LAYERS) for name, N, K in SHAPES[:4]]
    name, N, K = SHAPES[4]
    model.append((gk.pack(kind, *canon[name], group), N, K))
    xs = {K: torch.randn(m, K) for _, _, K in SHAPES}
    outs = {N: torch.empty(m, N) for _, N, _ in SHAPES}

    def token():
        for p, N, K in model:
            gk.gemm(kind, xs[K], p, None, N, K, group, out=outs[N])
    return token, sum(p.numel() for p, _, _ in model)


def sweep_prefetch(a, gen, big) -> int:
    """Median ms a token of the whole model per (hint, distance), configurations interleaved in each round so
    the machine's drift hits them alike; the CPU's defaults are restored at the end."""
    ext, f = gk._extension(), gk.cpu_features()
    hints = ["nta", "t0", "t1", "t2"]
    default = (hints.index(f["prefetch_hint"]), f["prefetch"])
    print(f"defaults on this CPU: prefetch_hint={f['prefetch_hint']} prefetch={f['prefetch']} B; "
          f"read bandwidth {read_bw(big):.1f} GB/s")
    configs = [(h, d) for h in (0, 1, 3) for d in (1536, 3072, 6144)]
    try:
        for kname in a.kinds:
            token, total = whole_model(KIND[kname], a.group, a.m, gen)
            times = {c: [] for c in configs}
            for _ in range(max(3, a.reps)):
                for c in configs:
                    ext._tune("pfhint", c[0])
                    ext._tune("prefetch", c[1])
                    token()
                    t0 = time.perf_counter()
                    token()
                    times[c].append(time.perf_counter() - t0)
            for (h, d), ts in times.items():
                t = statistics.median(ts)
                mark = "  (default)" if (h, d) == default else ""
                print(f"  {kname} {hints[h]:3} {d:5} B: {t * 1e3:6.1f} ms a token = {total / t / 1e9:5.1f} GB/s{mark}")
            del token
    finally:
        ext._tune("pfhint", default[0])
        ext._tune("prefetch", default[1])
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["q4", "q8"], choices=list(KIND))
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--no-model", action="store_true", help="skip the whole-model loop")
    ap.add_argument("--no-torch", action="store_true", help="skip the fp32 F.linear reference")
    ap.add_argument("--reps", type=int, default=3, help="whole-model passes (best and median reported)")
    ap.add_argument("--m", type=int, default=1, help="rows of x (decode: 1)")
    ap.add_argument("--sweep-prefetch", action="store_true",
                    help="instead: the whole model under each software-prefetch hint (nta/t0/t2) and distance "
                         "(1536/3072/6144 B), interleaved over --reps rounds, median ms a token")
    a = ap.parse_args(argv)

    if not gk.available():
        print("glmkit kernels unavailable:", gk.reason())
        return 1
    gk.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    print(f"threads={a.threads} group={a.group} M={a.m} cpu={gk.cpu_features()} torch={torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    big = torch.randint(0, 256, (1 << 30,), dtype=torch.uint8, generator=gen)
    if a.sweep_prefetch:
        return sweep_prefetch(a, gen, big)
    bw = read_bw(big)
    print(f"read bandwidth (C streaming read, {a.threads} threads, 1 GiB): {bw:.1f} GB/s\n")

    rows = []
    hdr = (f"{'kind':4} {'layer':7} {'N x K':>12} {'MB':>7} {'us/call':>9} {'GB/s':>6} {'%bw':>5} "
           f"{'fp32 us':>9} {'speedup':>7}")
    print(hdr)
    print("-" * len(hdr))
    for kname in a.kinds:
        kind = KIND[kname]
        for name, N, K in SHAPES:
            q, s = canonical(kind, N, K, a.group, gen)
            nbytes = gk.packed_nbytes(kind, N, K, a.group)
            copies = max(1, -(-(384 << 20) // nbytes))       # >= 384 MiB in flight: not cache resident
            packs = [gk.pack(kind, q, s, a.group) for _ in range(copies)]
            x = torch.randn(a.m, K)
            y = torch.empty(a.m, N)
            bw_now = read_bw(big, 2)
            n_calls = max(20, min(400, int(3e9 / nbytes)))
            t = time_calls(lambda i, packs=packs: gk.gemm(kind, x, packs[i % copies], None, N, K, a.group, out=y), n_calls)
            gbs = nbytes / t / 1e9
            tf = float("nan")
            if not a.no_torch:
                w = dequant(kind, q, s, a.group)
                tf = time_calls(lambda i: F.linear(x, w), max(5, n_calls // 8))
                del w
            rows.append((kname, name, t))
            print(f"{kname:4} {name:7} {N:>6}x{K:<5} {nbytes / 1e6:7.1f} {t * 1e6:9.0f} {gbs:6.1f} "
                  f"{100 * gbs / max(bw, bw_now):5.0f} {tf * 1e6:9.0f} {tf / t:7.1f}")
            del packs, q, s
        print()

    if not a.no_model:
        print(f"whole model (ChatGLM3-6B linear layers: {LAYERS} x [qkv, dense, up, down] + output, "
              f"distinct buffers, M={a.m}):")
        for kname in a.kinds:
            token, total = whole_model(KIND[kname], a.group, a.m, gen)
            token()
            ts = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                token()
                ts.append(time.perf_counter() - t0)
            bw_now = read_bw(big, 2)
            best, med = min(ts), statistics.median(ts)
            print(f"  {kname}: {total / 1e9:.2f} GB, {LAYERS * 4 + 1} calls/token: best {best * 1e3:.0f} ms "
                  f"= {1 / best:.2f} tok/s ({total / best / 1e9:.1f} GB/s, "
                  f"{100 * total / best / 1e9 / max(bw, bw_now):.0f}% of read bw), median {1 / med:.2f} tok/s; "
                  f"read bw now {bw_now:.1f} GB/s")
            del token
    return 0


if __name__ == "__main__":
    sys.exit(main())
