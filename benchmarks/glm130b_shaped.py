"""GLM-130B-shaped SAT checkpoint: write it, then measure load time, peak RSS and decode tokens/s.

The checkpoint has GLM-130B's widths (hidden 12288, 96 heads, GeGLU inner 32768, vocab 150528) but only
--layers of its 70 layers (default 2: ~11 GB of fp16), in the released SwissArmyTransformer layout: `latest`,
`<iteration>/mp_rank_XX_model_states.pt` ({"module": state_dict}, fp16, split --shards ways by GLM-130B's
tools/convert_tp.py rules; 8 as released) and a model_args.json of SAT arguments. Random weights (normal,
std 0.02; fixed seed per rank and tensor), written rank by rank, so writing holds one rank at a time.
--sat-bits 4|8 writes GLM-130B's own quantized shards instead (as convert_tp.py --quantization-bit-width).

Each measurement runs in a fresh process (its peak RSS, VmHWM, is that load alone, including the interpreter
and torch, ~0.3 GiB): glmkit.load(dir) with --quantize (default int4: glmkit's blocks, quantized while
loading, a 64 MB slice at a time) or --quantize none --dtype bfloat16, then --tokens greedy decode steps after
a --prompt-len token prompt through the engine (tokens/s of the decode steps only).

--tp N: tensor-parallel degree of the *inference*. N > 1 runs the same child under `torchrun
--nproc_per_node N` (gloo): each rank reads only its mp_rank shards (glmkit/parallel/sat_load.py; N must
divide --shards or be a multiple of it), rank 0 decodes and the others follow; each rank reports its own load
time and peak RSS, the summary line the slowest load and the largest peak. With 2 CPU cores, give each rank
its share (OMP_NUM_THREADS; torchrun sets 1 when it is unset).

Run from the repository root:
    python benchmarks/glm130b_shaped.py                       # 2 layers, 8 shards, INT4 at load, TP 1
    python benchmarks/glm130b_shaped.py --layers 1 --tokens 4 # quicker
    python benchmarks/glm130b_shaped.py --sat-bits 4 --dir /tmp/glmkit-bench/glm130b-int4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
ICE = (REPO_ROOT / ".." / "shared" / "glm" / "official" / "chatglm-6b" / "ice_text.model").resolve()
ITERATION = "49300"


def sat_specs(layers: int, shards: int) -> list[tuple[str, tuple, str]]:
    """(SAT key, full shape, convert_tp rule) of every tensor of a GLM-130B with `layers` layers."""
    from glmkit.checkpoint import KEY_MAPS
    from glmkit.config import GLM130B_SAT_ARGS, from_sat_args
    from glmkit.model import GLM
    from glmkit.sat_checkpoint import tp_rule

    cfg = from_sat_args({**GLM130B_SAT_ARGS, "num-layers": layers, "model-parallel-size": shards})
    with torch.device("meta"):
        model = GLM(cfg)
    out = []
    for ours, p in model.named_parameters():
        parts = ours.split(".")
        if parts[0] == "layers":
            key = KEY_MAPS["sat"][".".join(["layers", "{i}"] + parts[2:])].replace("{i}", parts[1])
        else:
            key = KEY_MAPS["sat"][ours]
        out.append((key, tuple(p.shape), tp_rule(key)))
    return out


def shard_shape(shape: tuple, rule: str, tp: int) -> tuple:
    if rule == "replicate":
        return shape
    if rule == "dim1":
        return (shape[0], shape[1] // tp) + shape[2:]
    return (shape[0] // tp,) + shape[1:]


def write_checkpoint(out: Path, layers: int, shards: int, sat_bits: int = 0) -> int:
    """Write the SAT folder rank by rank -> bytes written."""
    from glmkit.config import GLM130B_SAT_ARGS
    from glmkit.sat_checkpoint import QUANTIZED, quantize_sat, short_name

    if out.exists():
        shutil.rmtree(out)
    (out / ITERATION).mkdir(parents=True)
    total = 0
    specs = sat_specs(layers, shards)
    for r in range(shards):
        sd = {}
        for j, (key, shape, rule) in enumerate(specs):
            g = torch.Generator().manual_seed(1000 * r + j)
            s = shard_shape(shape, rule, shards)
            if key.endswith(("layernorm.weight",)):
                t = torch.ones(s, dtype=torch.float16)
            else:
                t = torch.empty(s, dtype=torch.float16).normal_(0.0, 0.02, generator=g)
            if sat_bits and short_name(key) in QUANTIZED:
                sd[key], sd[key + "_scale"] = quantize_sat(t, sat_bits)
            else:
                sd[key] = t
        path = out / ITERATION / f"mp_rank_{r:02d}_model_states.pt"
        torch.save({"module": sd}, path)
        total += path.stat().st_size
        print(f"  wrote {path.name}: {path.stat().st_size / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        del sd
    args = {**GLM130B_SAT_ARGS, "num-layers": layers, "model-parallel-size": shards}
    if sat_bits:
        args["quantization-bit-width"] = sat_bits
    (out / "model_args.json").write_text(json.dumps(args, indent=1))
    if ICE.is_file():
        (out / "ice_text.model").symlink_to(ICE)
    (out / "latest").write_text(ITERATION)                 # last: its presence means a finished write
    return total


def _vm(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20           # kB -> GiB
    return float("nan")


def child(args) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import glmkit

    rank = 0
    if args.tp > 1:                        # under torchrun: one process per rank, each reading its SAT shards
        from glmkit.parallel import dist
        rank = dist.init_distributed("cpu").rank
    t0, c0 = time.perf_counter(), time.process_time()
    q = None if args.quantize == "none" else args.quantize
    pipe = glmkit.load(args.dir, dtype=args.dtype if q is None else None, quantize=q, ctx=256, tp=args.tp)
    load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0   # CPU: less noisy when loaded
    rss_load = _vm("VmHWM")
    kthreads = args.threads or max(1, len(os.sched_getaffinity(0)) // args.tp)    # the cores shared by the ranks
    try:
        from glmkit import kernels
        kernels.set_num_threads(kthreads)
    except (ImportError, OSError, RuntimeError, AttributeError):
        kthreads = None                                            # no kernel extension: PyTorch's path
    row = {"tp": args.tp, "rank": rank, "load_s": round(load_s, 2), "load_cpu_s": round(load_cpu, 2),
           "peak_rss_gib_load": round(rss_load, 3), "dtype": str(pipe.model.dtype), "quantize": args.quantize,
           "threads": torch.get_num_threads(), "kernel_threads": kthreads}
    if rank > 0:                           # followers make rank 0's model calls until it stops them
        from glmkit.parallel.runtime import follow
        follow(pipe.model)
        print(json.dumps({**row, "peak_rss_gib": round(_vm("VmHWM"), 3)}), flush=True)
        return
    ids = [20100 + i for i in range(args.prompt_len - 2)] + [150001, 150004]   # text ids, [gMASK], sop
    run = pipe.start_generate(ids, max_new_tokens=args.tokens, temperature=0)
    n = len(list(run.tokens))
    st = run.stats
    if args.tp > 1:
        from glmkit.parallel.runtime import stop
        stop(pipe.model)
    print(json.dumps({**row, "peak_rss_gib": round(_vm("VmHWM"), 3), "decode_tok_s": round(st.decode_tps, 3),
                      "new_tokens": n, "prefill_s": round(st.ttft, 2)}), flush=True)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=8, help="tensor-parallel split of the checkpoint (8 as released)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the inference")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--rewrite", action="store_true")
    ap.add_argument("--sat-bits", type=int, choices=(0, 4, 8), default=0)
    ap.add_argument("--quantize", default="int4", help="int4 | int8 | none (glmkit's, while loading)")
    ap.add_argument("--dtype", default="bfloat16", help="with --quantize none")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0,
                    help="quantized-kernel threads per rank (default: this process's CPUs / --tp)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dir is None:
        q = f"-int{args.sat_bits}" if args.sat_bits else ""
        args.dir = Path(f"/tmp/glmkit-bench/glm130b-{args.layers}layers-mp{args.shards}{q}")
    if args.child:
        child(args)
        return 0
    if args.rewrite or not (args.dir / "latest").is_file():
        t = time.perf_counter()
        nbytes = write_checkpoint(args.dir, args.layers, args.shards, args.sat_bits)
        print(f"wrote {args.dir}: {nbytes / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if args.sat_bits:
        args.quantize = f"int{args.sat_bits}"
    cmd = [sys.argv[0], "--child", "--dir", str(args.dir), "--tp", str(args.tp), "--quantize", args.quantize,
           "--dtype", args.dtype, "--tokens", str(args.tokens), "--prompt-len", str(args.prompt_len),
           "--layers", str(args.layers), "--shards", str(args.shards), "--threads", str(args.threads)]
    if args.tp > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.tp),
               "--master_port", str(_free_port())] + cmd
    else:
        cmd = [sys.executable] + cmd
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stderr.write(res.stderr[-2000:] if res.returncode else "")
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        print(json.dumps(r))
    if not rows:
        return res.returncode or 1
    worst = max(r["peak_rss_gib"] for r in rows)
    print(f"glm130b_shaped layers={args.layers} shards={args.shards} tp={args.tp} quantize={args.quantize} "
          f"load_s={max(r['load_s'] for r in rows)} load_cpu_s={max(r['load_cpu_s'] for r in rows)} "
          f"peak_rss_gib_per_rank={worst} "
          f"decode_tok_s={next(r['decode_tok_s'] for r in rows if r['rank'] == 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
