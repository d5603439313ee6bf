"""Benchmark tensor-parallel loading and decoding: per-rank peak RSS and load time at TP 1 and TP 2, and
decode tokens/s, on a ChatGLM3-6B-shaped random checkpoint (the published widths, fewer layers: --layers).

Each configuration runs in fresh processes: TP 1 as `python tp_load.py --measure`, TP 2 under
`torch.distributed.run --standalone --nproc_per_node 2` (gloo on CPU). Every rank reports its own peak RSS
(VmHWM: interpreter + torch included, printed apart as base), the bytes of the weights it holds and its load
seconds; rank 0 then decodes --new greedy tokens after a 16-token prompt through the engine and reports
tokens/s. TP 1 uses --threads threads, TP 2 --threads / 2 per rank, so both use the same cores.

The claim checked: a TP-N rank's peak RSS is about 1/N of the model plus at most one file shard (each rank
reads only its slices of each tensor and drops the mapped pages it read): the column peak - base - held is
what loading cost beyond the weights the rank keeps.

    python benchmarks/tp_load.py                       # 4 layers (2.7 GB bf16), writes the checkpoint once
    python benchmarks/tp_load.py --layers 8 --quantize int4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def measure(args):
    import torch

    import load as load_bench
    from glmkit.quant import prepare_model, quantized_bytes
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    threads = max(1, args.threads // world)
    torch.set_num_threads(threads)
    base = load_bench.peak_rss_gib()
    t0 = time.perf_counter()
    if world > 1:
        from glmkit.parallel import dist
        from glmkit.parallel.load import load_sharded
        dist.init_distributed("cpu")
        model, _ = load_sharded(args.dir, rank, world, dtype=args.dtype, quantize=args.quantize)
    else:
        from glmkit.checkpoint import load_model
        model, _ = load_model(args.dir, dtype=args.dtype, quantize=args.quantize)
    seconds = time.perf_counter() - t0
    peak = load_bench.peak_rss_gib()
    if model.config.quantization:
        from glmkit import kernels
        prepare_model(model, own_threads=False)
        if kernels.available():
            kernels.set_num_threads(threads)
    out = {"tp": world, "rank": rank, "load_s": round(seconds, 2), "peak_rss_gib": round(peak, 3),
           "base_rss_gib": round(base, 3), "weights_gib": round(quantized_bytes(model) / 2**30, 3),
           "threads": threads}
    from glmkit.engine import Engine
    from glmkit.sampling import SamplingParams
    if world > 1 and rank:
        from glmkit.parallel.runtime import follow
        follow(model)
    else:
        if world > 1:
            from glmkit.parallel.runtime import lead, stop
            lead(model)
        eng = Engine(model, 256, slots=1, cache_mb=0)
        stream = eng.generate(list(range(100, 116)), SamplingParams(temperature=0.0, max_new_tokens=args.new))
        toks, t_first = [], None
        for tok in stream:
            toks.append(tok)
            if t_first is None:
                t_first = time.perf_counter()
        out["decode_tok_s"] = round((len(toks) - 1) / (time.perf_counter() - t_first), 3)
        if world > 1:
            stop(model)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(out))


def run(args, tp: int) -> list[dict]:
    import tempfile
    out = Path(tempfile.mkdtemp(prefix="tp_load-"))
    me = [str(Path(__file__).resolve()), "--measure", "--out", str(out), "--dir", str(args.dir), "--dtype", args.dtype,
          "--threads", str(args.threads), "--new", str(args.new)] + (["--quantize", args.quantize] if args.quantize else [])
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp)] if tp > 1
                              else []) + me
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // tp)), PYTHONPATH=str(HERE.parent))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"TP {tp} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(tp)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None, help="default /tmp/glmkit-bench-tp/chatglm3-6b-<N>layers")
    ap.add_argument("--dtype", default="bfloat16", help="load dtype (default bfloat16, as the checkpoint)")
    ap.add_argument("--quantize", default=None, help="int4 / int8: quantize each rank's slices while loading")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--new", type=int, default=8, help="greedy tokens decoded (default 8)")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dir = args.dir or Path(f"/tmp/glmkit-bench-tp/chatglm3-6b-{args.layers}layers")
    if args.measure:
        measure(args)
        return
    import load as load_bench
    if not load_bench.is_complete(args.dir, args.layers):
        load_bench.write_checkpoint(args.dir, args.layers)
    index = json.loads((args.dir / load_bench.INDEX_NAME).read_text())
    total = index["metadata"]["total_size"] / 2**30
    shards = [args.dir / n for n in sorted(set(index["weight_map"].values()))]
    biggest = max(p.stat().st_size for p in shards) / 2**30
    load_bench.warm_up(shards)
    print(f"{args.dir}: {total:.2f} GiB of bf16 weights in {len(shards)} shards (largest {biggest:.2f} GiB); "
          f"dtype {args.dtype}{', ' + args.quantize if args.quantize else ''}; {args.threads} threads in all")
    print("| TP | rank | load s | peak RSS GiB | base GiB | weights held GiB | peak - base - held GiB | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for tp in (1, 2):
        for r in run(args, tp):
            extra = r["peak_rss_gib"] - r["base_rss_gib"] - r["weights_gib"]
            print(f"| {tp} | {r['rank']} | {r['load_s']} | {r['peak_rss_gib']} | {r['base_rss_gib']} | "
                  f"{r['weights_gib']} | {extra:.3f} | {r.get('decode_tok_s', '')} |", flush=True)
    print(f"claim: each rank's peak - base - held stays under one shard ({biggest:.2f} GiB)")


if __name__ == "__main__":
    main()
