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

Shapes (--shape): chatglm3-6b (default), chatglm3-6b-32k (the same weights, ChatGLM3-6B-32K's config: rotary base
x50, 32768 positions; llama.cpp runs the chatglm3-6b GGUFs with that rope base), glm-4-9b (the GGUF export gets
a byte-level BPE tokenizer of GLM-4's size written here: 151329 ranks, no GLM-4 tokenizer file being at hand;
speed does not depend on it), chatglm-6b (against chatglm.cpp: llama.cpp has no ChatGLM-6B; its files are written
by benchmarks/_chatglm_cpp.py from the same folders). --layers N makes every shape N layers deep (a short
check; its own folders). --ctx 8192 / 32768 rows decode at that depth: the prompt is ctx - gen - 1 tokens
(read by each engine, so those rows take long: ~10-20 prompt tok/s on 2 cores), unless --prompt-tokens says.
--kv-cache int8 runs glmkit's rows on its int8 KV cache.

Run from the repository root (needs the bench extra: pip install -e ".[bench]"; chatglm.cpp rows: the
chatglm-cpp package, built from its sdist -- see the README):
    python benchmarks/decode.py                     # everything, ~30 min the first time (writes ~30 GB)
    python benchmarks/decode.py --engines glmkit-int4,llama-q4_0 --gen 32
    python benchmarks/decode.py --shape glm-4-9b --engines glmkit-int4,llama-q4_0
    python benchmarks/decode.py --shape chatglm-6b  # glmkit vs chatglm.cpp q4_0 / q8_0 / f16
    python benchmarks/decode.py --shape chatglm3-6b-32k --ctx 32768 --engines glmkit-int4,llama-q4_0
    python benchmarks/decode.py --layers 2 --shape chatglm-6b --gen 16 --prompt-tokens 64   # quick check
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GLMKIT = ["glmkit-bf16", "glmkit-int8", "glmkit-int4"]
LLAMA = ["llama-f16", "llama-q8_0", "llama-q4_0"]
CHATGLM_CPP = ["chatglmcpp-f16", "chatglmcpp-q8_0", "chatglmcpp-q4_0"]
ENGINES = GLMKIT + LLAMA + CHATGLM_CPP
SHAPES = ["chatglm3-6b", "chatglm3-6b-32k", "glm-4-9b", "chatglm-6b"]
QTYPE = {"glmkit-bf16": "f16", "glmkit-int8": "q8_0", "glmkit-int4": "q4_0"}
GLM4_RANKS = 151329           # GLM-4's ordinary tokens; its special tokens follow (151329 = <|endoftext|>)
RSS_LIMIT_GB = 4.0            # INT4 chat at 2048 tokens of context (issue 3)


def pair_of(name: str, shape: str) -> str:
    """The other engine a glmkit row is compared with: chatglm.cpp for ChatGLM-6B, llama.cpp otherwise."""
    return ("chatglmcpp-" if shape == "chatglm-6b" else "llama-") + QTYPE.get(name, "")


def cpu_model() -> str:
    """lscpu's model name, and the vector extensions the kernels care about."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    ext = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(ext) or 'no AVX2'}; {os.cpu_count()} CPUs)"


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM (Linux only)")


def prompt_ids(n: int, vocab: int, seed: int = 0, chatglm6b: bool = False) -> list[int]:
    """n random ordinary tokens; ChatGLM-6B's end in [gMASK] <sop> as its prompts do (a bidirectional context
    of n - 1 tokens, then the answer's 2D positions)."""
    import random
    rng = random.Random(seed)
    ids = [rng.randrange(100, min(vocab, 60000)) for _ in range(n)]   # ordinary tokens, no specials
    return ids[:-2] + [130001, 130004] if chatglm6b and n > 2 else ids


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


def child_glmkit(folder: str, dtype: str, threads: int, n_prompt: int, n_gen: int, ctx: int,
                 kv_cache: str = "auto") -> dict:
    from glmkit.checkpoint import load_model
    from glmkit.cli.common import set_threads
    from glmkit.engine import Engine
    from glmkit.quant import prepare_model, quantized_bytes
    from glmkit.sampling import SamplingParams

    set_threads(threads)                          # PyTorch and the kernels, as --threads does
    model, _ = load_model(folder, dtype=None if dtype == "auto" else dtype)
    prepare_model(model)                          # as glmkit.load(): quantized and bf16 layers onto the kernels
    eng = Engine(model, max_seq=ctx,              # the Pipeline's engine: one slot
                 kv_dtype=None if kv_cache == "auto" else kv_cache)
    ids = prompt_ids(n_prompt, model.config.vocab_size, chatglm6b=model.config.family == "chatglm")
    # warm-up: page weights in, pack kernels, first-call overheads
    list(eng.generate(ids[:16], SamplingParams(temperature=0, max_new_tokens=4), stop_ids=()))
    eng.reset()                                   # the measured prompt reuses nothing
    stream = eng.generate(ids, SamplingParams(temperature=0, max_new_tokens=n_gen), stop_ids=())
    n = sum(1 for _ in stream)
    st = stream.stats
    return {"prefill_tps": st.prefill_tps, "decode_tps": st.decode_tps, "new_tokens": n,
            "peak_rss": peak_rss_bytes(), "weight_bytes": quantized_bytes(model), "decode_path": eng.decode_path}


def child_llama(path: str, threads: int, n_prompt: int, n_gen: int, ctx: int, rope_base: float = 0.0) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                n_ubatch=512, logits_all=False, verbose=False, rope_freq_base=rope_base)
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


def child_chatglmcpp(path: str, threads: int, n_prompt: int, n_gen: int, ctx: int) -> dict:
    """chatglm.cpp's own greedy step (BaseModelForCausalLM.generate_next_token) over token ids. Its thread
    count is its own: all cores up to 4 (half of them above 4), set per call by chatglm.cpp; the process is
    pinned to `threads` CPUs."""
    import chatglm_cpp

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    pipe = chatglm_cpp.Pipeline(path, max_length=ctx)
    model = pipe.model
    gc = chatglm_cpp._C.GenerationConfig(max_length=ctx, max_new_tokens=n_gen, do_sample=False)
    ids = prompt_ids(n_prompt, model.config.vocab_size, chatglm6b=True)
    model.generate_next_token(ids[-16:], None, gc, 0, 16)   # warm-up
    t0 = time.perf_counter()
    out = list(ids)
    out.append(model.generate_next_token(out, None, gc, 0, len(out)))
    t1 = time.perf_counter()
    for _ in range(n_gen - 1):
        out.append(model.generate_next_token(out, None, gc, len(out) - 1, len(out)))
    t2 = time.perf_counter()
    return {"prefill_tps": len(ids) / (t1 - t0), "decode_tps": (n_gen - 1) / (t2 - t1), "new_tokens": n_gen,
            "peak_rss": peak_rss_bytes(), "weight_bytes": os.path.getsize(path)}


def child_chatglmcpp_file(src: str, out: str, qtype: str) -> dict:
    from _chatglm_cpp import write_chatglm6b
    t = time.perf_counter()
    n = write_chatglm6b(Path(src), Path(out), qtype)
    return {"seconds": time.perf_counter() - t, "bytes": n}


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

def write_glm4_tokenizer(folder: Path, n: int = GLM4_RANKS):
    """A byte-level BPE file in tiktoken's format with n ranks (GLM-4's count): the 256 bytes, every 2-byte
    string, then 3-byte strings -- each the merge of two lower-ranked tokens, as GGUF's merges need."""
    import base64
    import itertools
    lines, rank = [], 0
    for length in (1, 2, 3):
        for t in itertools.product(range(256), repeat=length):
            if rank == n:
                break
            lines.append(f"{base64.b64encode(bytes(t)).decode()} {rank}")
            rank += 1
    tmp = folder / "tokenizer.model.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(folder / "tokenizer.model")


def float_dir_name(shape: str, layers) -> str:
    return f"{shape}-random" + (f"-{layers}layers" if layers else "")


def ensure_float(shape: str, base: Path, layers=None) -> Path:
    """The shape's random bf16 folder in the official layout (written once); layers: fewer than the shape's."""
    import load as load_bench
    if shape == "chatglm3-6b-32k":                 # ChatGLM3-6B's weights under the 32K model's config
        src = ensure_float("chatglm3-6b", base, layers)
        return _config_twin(src, base / float_dir_name(shape, layers), shape)
    if shape == "chatglm3-6b":
        n = layers or load_bench.FULL_LAYERS
        d = load_bench.default_dir(n)
        if not load_bench.is_complete(d, n):
            load_bench.write_checkpoint(d, n)
        return d
    from glmkit.config import PRESETS_HF
    hf, fam = PRESETS_HF[shape]
    n = layers or hf["num_layers"]
    d = base / float_dir_name(shape, layers)
    if fam == "chatglm":                           # ChatGLM-6B: its official tokenizer from ../shared
        tok_dir = load_bench.REPO_ROOT.parent / "shared" / "glm" / "official" / "chatglm-6b"
        files = ("ice_text.model", "tokenizer_config.json")
        if not load_bench.is_complete(d, n, tokenizer_files=files):
            load_bench.write_checkpoint(d, n, hf_config=dict(hf), family=fam, tokenizer_dir=tok_dir,
                                        tokenizer_files=files)
        return d
    if not load_bench.is_complete(d, n, tokenizer_files=()):
        load_bench.write_checkpoint(d, n, hf_config=dict(hf), family=fam, tokenizer_dir=None)
    if fam == "glm4" and not (d / "tokenizer.model").is_file():
        write_glm4_tokenizer(d)
    return d


def _config_twin(src: Path, dst: Path, shape: str) -> Path:
    """dst: src's weight files (symbolic links) under the preset `shape`'s config.json (same matrices)."""
    from glmkit.config import PRESETS_HF
    hf = dict(PRESETS_HF[shape][0])
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") == "glmkit":          # a glmkit folder: only the rotary base and length change
        from glmkit.config import preset
        p = preset(shape)
        cfg.update(rope_base=p.rope_base, max_seq_len=p.max_seq_len, name=p.name)
    else:
        cfg.update({k: hf[k] for k in ("seq_length", "rope_ratio", "_name_or_path")})
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def prepare(args, engines: list) -> tuple[dict, dict]:
    """Folders and model files the engines need, made once: -> (glmkit folders, other engines' files)."""
    tag = (f"-{args.layers}layers" if args.layers else "")
    base_shape = "chatglm3-6b" if args.shape == "chatglm3-6b-32k" else args.shape
    float_dir = ensure_float(args.shape, args.dir, args.layers)
    print(f"weights: {float_dir}")
    folders = {"glmkit-bf16": float_dir}
    for bits in (8, 4):
        name = f"glmkit-int{bits}"
        need = name in engines or pair_of(name, args.shape) in engines
        q_dir = args.dir / f"{base_shape}{tag}-int{bits}"
        folders[name] = q_dir
        if need and not (q_dir / "config.json").is_file():
            print(f"quantizing to int{bits} (quantize-on-load) ...", flush=True)
            src = ensure_float(base_shape, args.dir, args.layers)
            r = run_child("quantize", str(src), str(q_dir), f"int{bits}")
            if "error" in r:
                sys.exit(f"quantize failed: {r['error']}")
            limit = 1.2 * r["quantized_bytes"] + r["layer_fp16_bytes"]
            print(f"  {r['seconds']:.0f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB; quantized "
                  f"{r['quantized_bytes'] / 2**30:.2f} GiB; limit 1.2x + one fp16 layer = {limit / 2**30:.2f} GiB "
                  f"({'OK' if r['peak_rss'] <= limit else 'MISSED'})", flush=True)
        tok = float_dir / "tokenizer.model"
        if q_dir.is_dir() and tok.is_file() and not (q_dir / tok.name).is_file():   # a folder quantized before
            shutil.copyfile(tok, q_dir / tok.name)                                # the tokenizer was written
        if args.shape != base_shape and q_dir.is_dir():
            folders[name] = _config_twin(q_dir, args.dir / f"{args.shape}{tag}-int{bits}", args.shape)
    files = {}
    for name in LLAMA + CHATGLM_CPP:
        if name not in engines:
            continue
        qtype = name.split("-", 1)[1]
        src = float_dir if qtype == "f16" else folders[f"glmkit-int{qtype[1]}"]
        if name.startswith("llama"):                 # the 32K shape runs the base shape's GGUF (rope base given)
            path, kind = args.dir / f"{base_shape}{tag}-{qtype}.gguf", "export"
            src = (ensure_float(base_shape, args.dir, args.layers) if qtype == "f16"
                   else args.dir / f"{base_shape}{tag}-int{qtype[1]}")
        else:
            path, kind = args.dir / f"{args.shape}{tag}-{qtype}.chatglm.bin", "chatglmcpp_file"
        files[name] = path
        if not path.is_file():
            print(f"writing {path.name} ...", flush=True)
            r = run_child(kind, str(src), str(path), qtype)
            if "error" in r:
                print(f"  failed: {r['error']}")
    return folders, files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="chatglm3-6b", choices=SHAPES)
    ap.add_argument("--engines", help=f"comma list of {', '.join(ENGINES)} (default: glmkit's three and the "
                                      "three of llama.cpp, or of chatglm.cpp for --shape chatglm-6b)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, help="default 512, or ctx - gen - 1 when --ctx > 2048")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=2048, help="context positions allocated (KV cache)")
    ap.add_argument("--layers", type=int, help="layers of the model (default: the shape's)")
    ap.add_argument("--kv-cache", default="auto", choices=["auto", "fp16", "int8"], help="glmkit's KV cache")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/glmkit-bench"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        kind, *rest = json.loads(args.child)
        print(json.dumps(globals()[f"child_{kind}"](*rest)))
        return

    default = GLMKIT + (CHATGLM_CPP if args.shape == "chatglm-6b" else LLAMA)
    engines = [e.strip() for e in (args.engines or ",".join(default)).split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        sys.exit(f"unknown engine(s) {bad}; choose from {ENGINES}")
    if args.shape == "chatglm-6b" and any(e in LLAMA for e in engines):
        sys.exit("llama.cpp has no ChatGLM-6B architecture: use the chatglmcpp-* engines")
    if args.shape != "chatglm-6b" and any(e in CHATGLM_CPP for e in engines):
        sys.exit("the chatglmcpp-* engines run --shape chatglm-6b here")
    if args.prompt_tokens is None:
        args.prompt_tokens = 512 if args.ctx <= 2048 else args.ctx - args.gen - 1
    if args.prompt_tokens + args.gen >= args.ctx:
        sys.exit(f"--prompt-tokens {args.prompt_tokens} + --gen {args.gen} do not fit --ctx {args.ctx}")
    cpu = cpu_model()
    print(f"CPU: {cpu}")
    args.dir.mkdir(parents=True, exist_ok=True)
    folders, files = prepare(args, engines)
    rope_base = 0.0
    if args.shape == "chatglm3-6b-32k":
        from glmkit.config import preset
        rope_base = preset(args.shape).rope_base

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
            r = run_child("glmkit", str(folders[name]), dtype, args.threads, args.prompt_tokens, args.gen, args.ctx,
                          args.kv_cache, timeout=6 * 3600)
        elif not files[name].is_file():
            r = {"error": f"{files[name].name} missing"}
        elif name.startswith("llama"):
            r = run_child("llama", str(files[name]), args.threads, args.prompt_tokens, args.gen, args.ctx, rope_base,
                          timeout=6 * 3600)
        else:
            r = run_child("chatglmcpp", str(files[name]), args.threads, args.prompt_tokens, args.gen, args.ctx,
                          timeout=6 * 3600)
        results[name] = r
        if "error" in r:
            print(f"  {name}: {r['error']}")
        elif "decode_path" in r:
            print(f"  {name} decode path: {r['decode_path']}")
    probe()
    report(args, engines, results, bws, cpu)


def report(args, engines, results, bws, cpu):
    read_gbs = max(bws) if bws else float("nan")
    if bws:
        print(f"read bandwidth: {min(bws):.1f}-{max(bws):.1f} GB/s over the run; the roofline uses {read_gbs:.1f}")

    def f(x, fmt="{:.2f}"):
        return fmt.format(x) if isinstance(x, (int, float)) else "n/a"

    layers = f", {args.layers} layers" if args.layers else ""
    print(f"\n{args.shape}{layers}, {args.threads} threads, prompt {args.prompt_tokens}, {args.gen} new tokens, "
          f"ctx {args.ctx}, glmkit KV cache {args.kv_cache}; read bandwidth {read_gbs:.1f} GB/s; CPU {cpu}")
    other = "chatglm.cpp" if args.shape == "chatglm-6b" else "llama.cpp"
    hdr = (f"{'engine':15s} | {'weights GiB':>11s} | {'prefill tok/s':>13s} | {'decode tok/s':>12s} | "
           f"{'roofline tok/s':>14s} | {'% roofline':>10s} | {'peak RSS GiB':>12s} | {'vs ' + other:>22s}")
    print(hdr)
    print("-" * len(hdr))
    for name in engines:
        r = results[name]
        wb = r.get("weight_bytes")
        roof = read_gbs * 1e9 / wb if wb else None
        pct = 100 * r["decode_tps"] / roof if roof and "decode_tps" in r else None
        vs = ""
        o = results.get(pair_of(name, args.shape), {}) if name in GLMKIT else {}
        if "decode_tps" in r and "decode_tps" in o:
            vs = (f"decode {r['decode_tps'] / o['decode_tps']:.2f}x "
                  f"prefill {r['prefill_tps'] / o['prefill_tps']:.2f}x")
        print(f"{name:15s} | {f(wb / 2**30 if wb else None):>11s} | {f(r.get('prefill_tps')):>13s} | "
              f"{f(r.get('decode_tps')):>12s} | {f(roof):>14s} | {f(pct, '{:.0f}%'):>10s} | "
              f"{f(r['peak_rss'] / 2**30 if 'peak_rss' in r else None):>12s} | {vs:>22s}")

    def ratio(a, b, key):
        ra, rb = results.get(a, {}), results.get(b, {})
        return f"{ra[key] / rb[key]:.3f}" if key in ra and key in rb else "nan"

    i4 = results.get("glmkit-int4", {})
    roof4 = (100 * i4["decode_tps"] / (read_gbs * 1e9 / i4["weight_bytes"])) if "decode_tps" in i4 else float("nan")
    rss4 = i4.get("peak_rss", float("nan")) / 1e9
    if "peak_rss" in i4 and args.ctx <= 2048:
        print(f"\nINT4 peak RSS at ctx {args.ctx}: {rss4:.2f} GB ({i4['peak_rss'] / 2**30:.2f} GiB); "
              f"target <= {RSS_LIMIT_GB} GB: {'OK' if rss4 <= RSS_LIMIT_GB else 'MISSED'}")
    sh, full = args.shape, not args.layers
    q4 = ratio("glmkit-int4", "llama-q4_0", "decode_tps")
    glm6b = ratio("glmkit-int4", "chatglmcpp-q4_0", "decode_tps") if sh == "chatglm-6b" and full else "nan"
    glm4 = q4 if sh == "glm-4-9b" and full else "nan"
    long32 = q4 if args.ctx >= 32768 and full else "nan"
    base = sh in ("chatglm3-6b", "chatglm3-6b-32k")
    print(f"decode_int4_vs_q4_0={q4 if base else 'nan'} "
          f"decode_int8_vs_q8_0={ratio('glmkit-int8', 'llama-q8_0', 'decode_tps') if base else 'nan'} "
          f"prefill_int4_vs_q4_0={ratio('glmkit-int4', 'llama-q4_0', 'prefill_tps') if base else 'nan'} "
          f"roofline_int4={roof4 / 100:.3f} rss_int4_gb={rss4:.2f} "
          f"decode_glm6b_int4_vs_chatglmcpp_q4_0={glm6b} decode_glm4_int4_vs_q4_0={glm4} "
          f"decode_32k_int4_vs_q4_0={long32} "
          f"decode_f16_vs_f16={ratio('glmkit-bf16', 'llama-f16', 'decode_tps') if base else 'nan'} "
          f"prefill_f16_vs_f16={ratio('glmkit-bf16', 'llama-f16', 'prefill_tps') if base else 'nan'}")


if __name__ == "__main__":
    main()
