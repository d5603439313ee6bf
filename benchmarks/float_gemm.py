"""The float-weight kernels (glmkit.kernels kinds 16 / 17) on one ChatGLM3-6B-sized layer, beside PyTorch.

Prints, for M = 1 (decode), 32 (the engine's prefill chunk) and 256 rows, GFLOP/s of glmkit.kernels.gemm on a
bf16 and an fp16 weight and of PyTorch's matmul on the same weight in fp32 and in bf16, each timed by the
process's CPU time per thread as well as the wall clock (best of --repeats): on a loaded, shared machine the
CPU-time figures (work per CPU-second) compare kernels fairly, the wall figures do not.

    python benchmarks/float_gemm.py                     # 4096 x 4096, 1 thread
    python benchmarks/float_gemm.py --n 27392 --threads 2 --isa avx2
"""
from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--isa", default="auto")
    args = ap.parse_args()
    import glmkit.kernels as gk
    if not gk.available():
        raise SystemExit(f"kernels unavailable: {gk.reason()}")
    gk.set_isa(args.isa)
    gk.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    N, K = args.n, args.k
    w = torch.randn(N, K).bfloat16()
    packed = {"bf16": (gk.BF16, gk.pack_float(w)), "fp16": (gk.F16, gk.pack_float(w.half()))}
    wf = w.float()
    print(f"{N}x{K}, {args.threads} thread(s), isa {gk.isa()}; GFLOP/s per thread by CPU time (by wall time)")
    for M in (1, 32, 256):
        x = torch.randn(M, K)
        flop = 2 * M * N * K
        row = []
        for name, (kind, p) in packed.items():
            wall, cpu = timed(lambda: gk.gemm(kind, x, p, None, N, K, 0), args.repeats)
            row.append(f"glmkit {name} {flop / cpu / 1e9:6.1f} ({flop / wall / 1e9:6.1f})")
        for name, ww, xx in (("fp32", wf, x), ("bf16", w, x.bfloat16())):
            wall, cpu = timed(lambda: xx @ ww.T, args.repeats)
            row.append(f"torch {name} {flop / cpu / 1e9:6.1f} ({flop / wall / 1e9:6.1f})")
        print(f"M={M:<4d} " + " | ".join(row))


if __name__ == "__main__":
    main()
