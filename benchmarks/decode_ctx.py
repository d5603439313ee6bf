"""Decode speed deep in a long context, glmkit alone: what the attention over the KV cache costs per token.

A quantized folder (default: benchmarks/decode.py's ChatGLM3-6B-shaped INT4 one) under the ChatGLM3-6B-32K config
(rotary base x50, 32768 positions; the matrices are the same), one slot of --ctx positions whose first `pos`
positions are filled with random keys and values (speed does not depend on them, and reading 32K prompt tokens
first would take ~30 min on 2 cores), then --steps fused decode steps at pos, pos + 1, ... for every --pos, on
an fp16 and an int8 KV cache. Prints per row tok/s, ms per step, and the step's extra time over the shortest
position's (the attention's share), plus the KV bytes read per token. One process per cache type, the
positions in increasing order (the cache filled further for each).

    python benchmarks/decode_ctx.py                                   # pos 512, 8192, 32000; fp16 and int8
    python benchmarks/decode_ctx.py --pos 8192 --kv fp16 --steps 4    # one row
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(folder: str, positions: list, ctx: int, kv: str, steps: int, threads: int) -> list:
    import torch

    from glmkit.checkpoint import load_model
    from glmkit.cli.common import set_threads
    from glmkit.config import preset
    from glmkit.engine import KVCache
    from glmkit.engine.fast_decode import FastDecoder
    from glmkit.quant import prepare_model

    set_threads(threads)
    model, _ = load_model(folder)
    p32 = preset("chatglm3-6b-32k")
    if model.config.family == "chatglm3":            # the 32K model's rotary base and length, same matrices
        model.config.rope_base, model.config.max_seq_len = p32.rope_base, p32.max_seq_len
        model._rope_table = None
    prepare_model(model)
    # (written so that it also runs against an older glmkit with only the fp16 cache: A/B of the kernels)
    cache = KVCache.for_model(model, 1, ctx) if kv == "fp16" else KVCache.for_model(model, 1, ctx, dtype=kv)
    quantized = getattr(cache, "quantized", False)
    scales = (cache.k_scale, cache.v_scale) if quantized else ([None] * len(cache.k),) * 2
    g = torch.Generator().manual_seed(0)
    filled, out = 0, []
    for pos in sorted(positions):
        for i in range(len(cache.k)):              # random keys/values at [filled, pos)
            for t, s in ((cache.k[i], scales[0][i]), (cache.v[i], scales[1][i])):
                part = t[:, :, filled:pos]
                if quantized:
                    part.copy_(torch.randint(-127, 128, part.shape, dtype=torch.int8, generator=g))
                    s[:, :, filled:pos] = 0.02
                else:
                    part.copy_(torch.randn(part.shape, generator=g))
        filled = pos
        fd = FastDecoder(model, cache)
        fd.step([5], [pos], [0])                                  # warm-up
        t0 = time.perf_counter()
        for i in range(steps):
            fd.step([5 + i], [pos + 1 + i], [0])
        dt = (time.perf_counter() - t0) / steps
        out.append({"pos": pos, "ms": dt * 1e3, "tps": 1 / dt, "kv_bytes_per_token": cache.bytes_per_token * pos})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default="/tmp/glmkit-bench/chatglm3-6b-int4")
    ap.add_argument("--pos", default="512,8192,32000")
    ap.add_argument("--kv", default="fp16,int8")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    sys.path.insert(0, str(HERE))
    from decode import cpu_model
    cpu = cpu_model()
    positions = [int(p) for p in args.pos.split(",")]
    if max(positions) + args.steps + 2 > args.ctx:
        sys.exit(f"--pos up to {max(positions)} + {args.steps} steps do not fit --ctx {args.ctx}")
    print(f"{args.folder}, {args.threads} threads, CPU {cpu}")
    print(f"{'KV cache':8s} | {'position':>8s} | {'tok/s':>6s} | {'ms/step':>8s} | {'+ms over first':>14s} | "
          f"{'KV MB read/token':>16s}")
    for kv in args.kv.split(","):
        cmd = [sys.executable, __file__, "--child", json.dumps([args.folder, positions, args.ctx, kv, args.steps,
                                                                 args.threads])]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=3 * 3600)
        if p.returncode:
            print(f"{kv:8s} | error: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        rows = json.loads(p.stdout.strip().splitlines()[-1])
        for r in rows:
            print(f"{kv:8s} | {r['pos']:8d} | {r['tps']:6.2f} | {r['ms']:8.1f} | {r['ms'] - rows[0]['ms']:14.1f} | "
                  f"{r['kv_bytes_per_token'] / 1e6:16.0f}", flush=True)


if __name__ == "__main__":
    main()
