"""Benchmark checkpoint loading: glmkit.checkpoint.load_model against a plain safetensors read.

What it measures: wall-clock seconds and peak resident memory (RSS) to bring a ChatGLM3-6B-shaped
checkpoint (random bf16 weights, official Hugging Face layout, ~12.5 GB in ~2 GB safetensors shards)
into CPU memory with
  plain   safetensors.torch.load_file(shard, backend="pread") for every shard, all dicts kept alive;
  glmkit  glmkit.checkpoint.load_model(dir, dtype="bfloat16", device="cpu").
The plain baseline uses the pread backend because load_file's default (mmap) backend returns lazy views
of the file: it takes ~0 s and adds ~0 RSS until the tensors are touched, so it measures nothing.

Each load runs in a fresh subprocess, so its peak RSS (VmHWM) is that loader's alone; it includes the
interpreter and torch (~0.3 GiB). The pair runs --repeats times in alternating order after one untimed
warm-up read of all shards, and the median per loader is reported. The checkpoint is written once and
reused from its folder (--rewrite to write it again).

Run from the repository root:
    python benchmarks/load.py                          # full 28-layer model (writes 12.5 GB once)
    python benchmarks/load.py --layers 2 --repeats 1   # quick check on a 2-layer model
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
from tqdm import tqdm

import glmkit.checkpoint
import glmkit.model
from glmkit.config import from_hf

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = (REPO_ROOT / ".." / "shared" / "glm" / "official" / "chatglm3-6b").resolve()
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")
FULL_LAYERS = 28
MAX_SHARD_BYTES = 2 * 10**9
INDEX_NAME = "model.safetensors.index.json"
RSS_TARGET = 1.15       # glmkit peak RSS / weight bytes
TIME_TARGET = 1.5       # glmkit seconds / plain seconds


def default_dir(layers: int) -> Path:
    suffix = "" if layers == FULL_LAYERS else f"-{layers}layers"
    return Path(f"/tmp/glmkit-bench/chatglm3-6b-random{suffix}")


def is_complete(ckpt_dir: Path, layers: int, tokenizer_files=TOKENIZER_FILES) -> bool:
    """The index is written last, so its presence (plus every shard it names) means a finished write."""
    index, config = ckpt_dir / INDEX_NAME, ckpt_dir / "config.json"
    if not (index.is_file() and config.is_file()):
        return False
    if json.loads(config.read_text())["num_layers"] != layers:
        return False
    shard_names = set(json.loads(index.read_text())["weight_map"].values())
    return all((ckpt_dir / n).is_file() for n in shard_names | set(tokenizer_files))


def official_tensor_specs(hf_config: dict, family: str = "chatglm3") -> list[tuple[str, tuple[int, ...]]]:
    """(official name, shape) for every tensor of the official files, in model order."""
    cfg = from_hf(hf_config, family=family)
    with torch.device("meta"):      # shapes only, no memory
        model = glmkit.model.GLM(cfg)
    specs = []
    layout = "chatglm" if family == "chatglm" else "chatglm2"     # ChatGLM-6B's names, or GLM2+'s
    for ours, param in model.named_parameters():
        parts = ours.split(".")
        if parts[0] == "layers":    # layers.{i}.rest -> key pattern with {i}, layer index kept apart
            key, layer = ".".join(["layers", "{i}"] + parts[2:]), parts[1]
            official = glmkit.checkpoint.KEY_MAPS[layout][key].replace("{i}", layer)
        else:
            official = glmkit.checkpoint.KEY_MAPS[layout][ours]
        specs.append((official, tuple(param.shape)))
    if layout == "chatglm2":
        # the official files also carry the rotary inverse frequencies (rope_dim // 2 values), in the first shard
        specs.insert(1, ("transformer.rotary_pos_emb.inv_freq", (cfg.rope_dim // 2,)))
    return specs


def write_checkpoint(ckpt_dir: Path, layers: int, hf_config: dict | None = None, family: str = "chatglm3",
                     tokenizer_dir: Path | None = OFFICIAL_DIR, tokenizer_files=TOKENIZER_FILES):
    """Random bf16 weights in the official layout, generated shard by shard so memory stays ~one shard.
    Default: ChatGLM3-6B's published config.json; another generation's (e.g. a preset's) when given."""

    hf_config = dict(hf_config or json.loads((OFFICIAL_DIR / "config.json").read_text()))
    hf_config.update(torch_dtype="bfloat16", num_layers=layers)
    specs = official_tensor_specs(hf_config, family)

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]   # plan all shards first: file names need the count
    shard_bytes = 0
    for name, shape in specs:
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and shard_bytes + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, shape))
        shard_bytes += nbytes
    total_bytes = sum(2 * torch.Size(shape).numel() for _, shape in specs)

    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    for name in tokenizer_files if tokenizer_dir else ():
        shutil.copyfile(tokenizer_dir / name, ckpt_dir / name)

    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"writing {ckpt_dir.name}")
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            bar.update(2 * tensors[name].numel())
        bar.set_postfix_str(f"saving {file_name}")
        safetensors.torch.save_file(tensors, str(ckpt_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors
    bar.close()
    (ckpt_dir / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))


def peak_rss_gib() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak over fork/exec into it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20      # kB
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def measure(loader: str, ckpt_dir: Path):
    """Child process: load once, print {"seconds", "peak_rss_gib", "base_rss_gib"} as JSON."""
    base_rss_gib = peak_rss_gib()      # interpreter and imported modules: the baseline every loader pays
    shard_paths = glmkit.checkpoint.weight_files(ckpt_dir)
    t0 = time.perf_counter()
    if loader == "plain":
        loaded = [safetensors.torch.load_file(p, backend="pread") for p in shard_paths]
    else:
        loaded = glmkit.checkpoint.load_model(ckpt_dir, dtype="bfloat16", device="cpu")
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "base_rss_gib": base_rss_gib}))
    del loaded


def run_child(loader: str, ckpt_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--measure", loader, "--dir", str(ckpt_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{loader} load failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm_up(shard_paths: list[Path]):
    """Read every shard once so the first timed loader does not pay alone for a cold page cache."""
    for p in shard_paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=FULL_LAYERS,
                    help=f"transformer layers of the random checkpoint (default {FULL_LAYERS}, the real model)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="checkpoint folder (default /tmp/glmkit-bench/chatglm3-6b-random[-Nlayers])")
    ap.add_argument("--rewrite", action="store_true", help="write the checkpoint again even if complete")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per loader (default 2)")
    ap.add_argument("--measure", choices=["plain", "glmkit"], help=argparse.SUPPRESS)   # child process mode
    args = ap.parse_args()
    ckpt_dir = args.dir or default_dir(args.layers)

    if args.measure:
        measure(args.measure, ckpt_dir)
        return
    if args.rewrite or not is_complete(ckpt_dir, args.layers):
        write_checkpoint(ckpt_dir, args.layers)
    else:
        print(f"reusing {ckpt_dir} (--rewrite to write it again)")

    index = json.loads((ckpt_dir / INDEX_NAME).read_text())
    shard_paths = [ckpt_dir / n for n in sorted(set(index["weight_map"].values()))]
    weight_bytes = index["metadata"]["total_size"]
    weights_gib = weight_bytes / 2**30
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"{len(shard_paths)} shards, {weights_gib:.2f} GiB of weights, {ram_gib:.1f} GiB RAM")
    if 2 * weights_gib > ram_gib:
        print("note: RAM cannot hold both the loaded weights and the whole file in page cache, so every load "
              "re-reads part of the files from disk; timings include that disk I/O")

    warm_up(shard_paths)
    results: dict[str, list[dict]] = {"plain": [], "glmkit": []}
    for r in range(args.repeats):
        order = ("plain", "glmkit") if r % 2 == 0 else ("glmkit", "plain")
        for loader in order:
            res = run_child(loader, ckpt_dir)
            results[loader].append(res)
            print(f"  run {r + 1}/{args.repeats} {loader:6s} {res['seconds']:7.2f} s  "
                  f"peak RSS {res['peak_rss_gib']:.2f} GiB", flush=True)

    seconds = {k: statistics.median(x["seconds"] for x in v) for k, v in results.items()}
    rss_gib = {k: statistics.median(x["peak_rss_gib"] for x in v) for k, v in results.items()}
    base_rss_gib = statistics.median(x["base_rss_gib"] for v in results.values() for x in v)
    labels = {"plain": "plain (safetensors load_file)", "glmkit": "glmkit load_model"}

    print(f"\nmedian of {args.repeats} run(s); peak RSS includes {base_rss_gib:.2f} GiB for the interpreter "
          "and imports")
    print(f"{'loader':30s} | {'seconds':>8s} | {'peak RSS (GiB)':>14s} | {'RSS / weight bytes':>18s}")
    print(f"{'-' * 30}-+-{'-' * 8}-+-{'-' * 14}-+-{'-' * 18}")
    for k in ("plain", "glmkit"):
        print(f"{labels[k]:30s} | {seconds[k]:8.2f} | {rss_gib[k]:14.2f} | {rss_gib[k] / weights_gib:18.3f}")
    time_ratio = seconds["glmkit"] / seconds["plain"]
    rss_ratio = rss_gib["glmkit"] / weights_gib
    verdict = {True: "OK", False: "MISSED"}
    print(f"\nglmkit / plain time:            {time_ratio:.3f}x  (target <= {TIME_TARGET}x: "
          f"{verdict[time_ratio <= TIME_TARGET]})")
    print(f"glmkit peak RSS / weight bytes: {rss_ratio:.3f}x  (target <= {RSS_TARGET}x: "
          f"{verdict[rss_ratio <= RSS_TARGET]})")
    print(f"load_seconds_ratio={time_ratio:.3f} rss_over_weights={rss_ratio:.3f} "
          f"glmkit_seconds={seconds['glmkit']:.2f} plain_seconds={seconds['plain']:.2f} "
          f"glmkit_rss_gib={rss_gib['glmkit']:.2f} weights_gib={weights_gib:.2f}")


if __name__ == "__main__":
    main()
