"""Benchmark decoding: glmkit (bf16, INT8, INT4) against llama.cpp (f16, Q8_0, Q4_0) on the same weights.

What it measures, each engine in a fresh process (so peak RSS is its own), --threads threads (default 2):
  prefill tok/s   a --prompt-token (512) prompt of random ids, timed from the call to the first logits
  decode tok/s    --gen (128) greedy tokens after it, EOS ignored (tokens 2..gen over their wall time)
  peak RSS        VmHWM of that process (weights, KV cache for --ctx 2048 positions, runtime)
and the machine's read bandwidth (--threads threads reading a 2 GiB buffer with torch's sum and with the
kernels' AVX2 reader, best of 5 each), measured before every engine and at the end; the highest figure of the
run becomes each format's decode roofline: bandwidth / bytes of weights read per token (all matrices, the
output layer included; the embedding reads one row).

The weights: a ChatGLM3-6B-shaped (or --shape glm-4-9b) checkpoint with random bf16 values (speed does not
depend on them) in the official layout, written once to --dir (shared with benchmarks/load.py). glmkit INT8/INT4
folders are made from it with quantize-on-load (its peak RSS is reported: the limit is 1.2x the quantized size
plus one layer in fp16); the GGUF files for llama.cpp are exported by glmkit export-gguf: f16 from the float
folder, q8_0 / q4_0 from glmkit's INT8 / INT4 folders, so both engines run the very same quantized numbers
(all matrices, output layer included, at the stated type; embeddings: see glmkit/gguf_export.py).

Run from the repository root (needs the bench extra: pip install -e ".[bench]"):
    python benchmarks/decode.py                     # everything, ~30 min the first time (writes ~30 GB)
    python benchmarks/decode.py --engines glmkit-int4,llama-q4_0 --gen 32
    python benchmarks/decode.py --shape glm-4-9b --engines glmkit-int4,glmkit-int8
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

ENGINES = ["glmkit-bf16", "glmkit-int8", "glmkit-int4", "llama-f16", "llama-q8_0", "llama-q4_0"]
PAIRS = {"glmkit-bf16": "llama-f16", "glmkit-int8": "llama-q8_0", "glmkit-int4": "llama-q4_0"}
RSS_LIMIT_GB = 4.0            # INT4 chat at 2048 tokens of context (issue 3)


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM (Linux only)")


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    import random
    rng = random.Random(seed)
    return [rng.randrange(100, min(vocab, 60000)) for _ in range(n)]   # ordinary tokens, no specials


# ------------------------------------------------------------------------------------------------------------
# children: one measurement each, printing a JSON line
# ------------------------------------------------------------------------------------------------------------

def child_bandwidth(threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    buf = torch.ones(2 << 30 >> 2, dtype=torch.float32)          # 2 GiB, touched
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        float(buf.sum())
        best = max(best, buf.numel() * 4 / (time.perf_counter() - t))
    try:                                    # the kernels' own pool reading with AVX2 loads, when built
        from glmkit import kernels
        if kernels.available():
            kernels.set_num_threads(threads)
            for _ in range(5):
                best = max(best, buf.numel() * 4 / kernels.stream_read(buf))
    except ImportError:
        pass
    return {"read_gbs": best / 1e9}


def child_glmkit(folder: str, dtype: str, threads: int, n_prompt: int, n_gen: int, ctx: int) -> dict:
    from glmkit.checkpoint import load_model
    from glmkit.cli.common import set_threads
    from glmkit.engine import Engine
    from glmkit.quant import prepare_model, quantized_bytes
    from glmkit.sampling import SamplingParams

    set_threads(threads)                          # PyTorch and the kernels, as --threads does
    model, _ = load_model(folder, dtype=None if dtype == "auto" else dtype)
    prepare_model(model)                          # as glmkit.load(): quantized and bf16 layers onto the kernels
    eng = Engine(model, max_seq=ctx)              # the Pipeline's engine: one slot
    ids = prompt_ids(n_prompt, model.config.vocab_size)
    # warm-up: page weights in, pack kernels, first-call overheads
    list(eng.generate(ids[:16], SamplingParams(temperature=0, max_new_tokens=4), stop_ids=()))
    eng.reset()                                   # the measured prompt reuses nothing
    stream = eng.generate(ids, SamplingParams(temperature=0, max_new_tokens=n_gen), stop_ids=())
    n = sum(1 for _ in stream)
    st = stream.stats
    return {"prefill_tps": st.prefill_tps, "decode_tps": st.decode_tps, "new_tokens": n,
            "peak_rss": peak_rss_bytes(), "weight_bytes": quantized_bytes(model), "decode_path": eng.decode_path}


def child_llama(path: str, threads: int, n_prompt: int, n_gen: int, ctx: int) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                n_ubatch=512, logits_all=False, verbose=False)
    ids = prompt_ids(n_prompt, llm.n_vocab())
    V = llm.n_vocab()

    def last_argmax() -> int:
        # with logits_all=False Llama.scores stays zero: read the context's last logits directly
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(V,))))

    llm.eval(ids[:16])                                            # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = last_argmax()
    t1 = time.perf_counter()
    for _ in range(n_gen - 1):
        llm.eval([tok])
        tok = last_argmax()
    t2 = time.perf_counter()
    return {"prefill_tps": n_prompt / (t1 - t0), "decode_tps": (n_gen - 1) / (t2 - t1), "new_tokens": n_gen,
            "peak_rss": peak_rss_bytes(), "weight_bytes": os.path.getsize(path)}


def child_quantize(src: str, out: str, spec: str) -> dict:
    from glmkit.checkpoint import load_model, save_model
    from glmkit.quant import quantized_bytes

    t = time.perf_counter()
    model, _ = load_model(src, quantize=spec)
    seconds = time.perf_counter() - t
    rss = peak_rss_bytes()
    save_model(model, out, source_dir=src)
    cfg = model.config
    return {"seconds": seconds, "peak_rss": rss, "quantized_bytes": quantized_bytes(model),
            "layer_fp16_bytes": 2 * _layer_params(cfg)}


def _layer_params(cfg) -> int:
    import torch

    from glmkit.model import Block
    with torch.device("meta"):
        return sum(p.numel() for p in Block(cfg).parameters())


def child_export(src: str, out: str, qtype: str) -> dict:
    from glmkit.gguf_export import export_gguf
    t = time.perf_counter()
    export_gguf(src, out, qtype=qtype, progress=False)
    return {"seconds": time.perf_counter() - t, "bytes": os.path.getsize(out)}


def run_child(*args, timeout=3600) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------------------

def ensure_float(shape: str, base: Path) -> Path:
    import load as load_bench
    if shape == "chatglm3-6b":
        d = load_bench.default_dir(load_bench.FULL_LAYERS)
        if not load_bench.is_complete(d, load_bench.FULL_LAYERS):
            load_bench.write_checkpoint(d, load_bench.FULL_LAYERS)
        return d
    from glmkit.config import PRESETS_HF
    hf, fam = PRESETS_HF[shape]
    d = base / f"{shape}-random"
    if not load_bench.is_complete(d, hf["num_layers"], tokenizer_files=()):
        load_bench.write_checkpoint(d, hf["num_layers"], hf_config=dict(hf), family=fam, tokenizer_dir=None)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="chatglm3-6b", choices=["chatglm3-6b", "glm-4-9b"])
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=2048, help="context positions allocated (KV cache)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/glmkit-bench"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        kind, *rest = json.loads(args.child)
        print(json.dumps(globals()[f"child_{kind}"](*rest)))
        return

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        sys.exit(f"unknown engine(s) {bad}; choose from {ENGINES}")
    args.dir.mkdir(parents=True, exist_ok=True)
    float_dir = ensure_float(args.shape, args.dir)
    print(f"weights: {float_dir}")

    prep: dict[str, dict] = {}
    folders = {"glmkit-bf16": float_dir}
    for bits in (8, 4):
        name = f"glmkit-int{bits}"
        need = name in engines or f"llama-q{bits}_0" in engines
        q_dir = args.dir / f"{args.shape}-int{bits}"
        folders[name] = q_dir
        if need and not (q_dir / "config.json").is_file():
            print(f"quantizing to int{bits} (quantize-on-load) ...", flush=True)
            prep[name] = r = run_child("quantize", str(float_dir), str(q_dir), f"int{bits}")
            if "error" in r:
                sys.exit(f"quantize failed: {r['error']}")
            limit = 1.2 * r["quantized_bytes"] + r["layer_fp16_bytes"]
            print(f"  {r['seconds']:.0f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB; quantized "
                  f"{r['quantized_bytes'] / 2**30:.2f} GiB; limit 1.2x + one fp16 layer = {limit / 2**30:.2f} GiB "
                  f"({'OK' if r['peak_rss'] <= limit else 'MISSED'})", flush=True)
    ggufs = {"llama-f16": (float_dir, "f16"), "llama-q8_0": (folders["glmkit-int8"], "q8_0"),
             "llama-q4_0": (folders["glmkit-int4"], "q4_0")}
    for name, (src, qtype) in ggufs.items():
        path = args.dir / f"{args.shape}-{qtype}.gguf"
        if name in engines and not path.is_file():
            print(f"exporting {path.name} ...", flush=True)
            r = run_child("export", str(src), str(path), qtype)
            if "error" in r:
                print(f"  export failed: {r['error']}")

    # The machine's read bandwidth moves during a run (shared host: 22-34 GB/s seen in different runs), so it is
    # measured before every engine and once at the end, and the roofline uses the highest figure (the most
    # demanding roofline; an engine above 100% would mean the probe missed the machine's best moments).
    bws = []

    def probe():
        r = run_child("bandwidth", args.threads)
        if "read_gbs" in r:
            bws.append(r["read_gbs"])
            print(f"  read bandwidth with {args.threads} threads: {r['read_gbs']:.1f} GB/s", flush=True)

    results = {}
    for name in engines:
        probe()
        print(f"running {name} ...", flush=True)
        if name.startswith("glmkit"):
            dtype = "bfloat16" if name == "glmkit-bf16" else "auto"
            r = run_child("glmkit", str(folders[name]), dtype, args.threads, args.prompt_tokens, args.gen, args.ctx)
        else:
            path = args.dir / f"{args.shape}-{ggufs[name][1]}.gguf"
            r = (run_child("llama", str(path), args.threads, args.prompt_tokens, args.gen, args.ctx)
                 if path.is_file() else {"error": f"{path.name} missing"})
        results[name] = r
        if "error" in r:
            print(f"  {name}: {r['error']}")
        elif "decode_path" in r:
            print(f"  {name} decode path: {r['decode_path']}")
    probe()
    read_gbs = max(bws) if bws else float("nan")
    if bws:
        print(f"read bandwidth: {min(bws):.1f}-{max(bws):.1f} GB/s over the run; the roofline uses {read_gbs:.1f}")

    def f(x, fmt="{:.2f}"):
        return fmt.format(x) if isinstance(x, (int, float)) else "n/a"

    print(f"\n{args.shape}, {args.threads} threads, prompt {args.prompt_tokens}, {args.gen} new tokens, "
          f"ctx {args.ctx}; read bandwidth {read_gbs:.1f} GB/s")
    hdr = (f"{'engine':12s} | {'weights GiB':>11s} | {'prefill tok/s':>13s} | {'decode tok/s':>12s} | "
           f"{'roofline tok/s':>14s} | {'% roofline':>10s} | {'peak RSS GiB':>12s} | {'vs llama.cpp':>22s}")
    print(hdr)
    print("-" * len(hdr))
    for name in engines:
        r = results[name]
        wb = r.get("weight_bytes")
        roof = read_gbs * 1e9 / wb if wb else None
        pct = 100 * r["decode_tps"] / roof if roof and "decode_tps" in r else None
        vs = ""
        other = results.get(PAIRS.get(name, ""), {})
        if "decode_tps" in r and "decode_tps" in other:
            vs = (f"decode {r['decode_tps'] / other['decode_tps']:.2f}x "
                  f"prefill {r['prefill_tps'] / other['prefill_tps']:.2f}x")
        print(f"{name:12s} | {f(wb / 2**30 if wb else None):>11s} | {f(r.get('prefill_tps')):>13s} | "
              f"{f(r.get('decode_tps')):>12s} | {f(roof):>14s} | {f(pct, '{:.0f}%'):>10s} | "
              f"{f(r['peak_rss'] / 2**30 if 'peak_rss' in r else None):>12s} | {vs:>22s}")

    def ratio(a, b, key):
        ra, rb = results.get(a, {}), results.get(b, {})
        return f"{ra[key] / rb[key]:.3f}" if key in ra and key in rb else "nan"

    i4 = results.get("glmkit-int4", {})
    roof4 = (100 * i4["decode_tps"] / (read_gbs * 1e9 / i4["weight_bytes"])) if "decode_tps" in i4 else float("nan")
    rss4 = i4.get("peak_rss", float("nan")) / 1e9
    if "peak_rss" in i4:
        print(f"\nINT4 peak RSS at ctx {args.ctx}: {rss4:.2f} GB ({i4['peak_rss'] / 2**30:.2f} GiB); "
              f"target <= {RSS_LIMIT_GB} GB: {'OK' if rss4 <= RSS_LIMIT_GB else 'MISSED'}")
    print(f"decode_int4_vs_q4_0={ratio('glmkit-int4', 'llama-q4_0', 'decode_tps')} "
          f"decode_int8_vs_q8_0={ratio('glmkit-int8', 'llama-q8_0', 'decode_tps')} "
          f"prefill_int4_vs_q4_0={ratio('glmkit-int4', 'llama-q4_0', 'prefill_tps')} "
          f"roofline_int4={roof4 / 100:.3f} rss_int4_gb={rss4:.2f} "
          f"decode_f16_vs_f16={ratio('glmkit-bf16', 'llama-f16', 'decode_tps')} "
          f"prefill_f16_vs_f16={ratio('glmkit-bf16', 'llama-f16', 'prefill_tps')}")


if __name__ == "__main__":
    main()
