"""Model folders for `benchmarks/serve_load.py --shape`: built once, shared with benchmarks/decode.py.

--shape chatglm3-6b: the ChatGLM3-6B-shaped random INT4 folder with the official ChatGLM3 tokenizer, made exactly
as benchmarks/decode.py makes its glmkit-int4 engine's folder, so both benchmarks share it:
  1. decode.ensure_float("chatglm3-6b", DIR): random bf16 weights in the official layout, written by
     benchmarks/load.py's write_checkpoint (tokenizer.model and tokenizer_config.json copied from
     ../shared/glm/official/chatglm3-6b) to /tmp/glmkit-bench/chatglm3-6b-random (load.py's folder: this one
     does not follow DIR, as in decode.py); ~12.5 GB, reused when complete;
  2. decode.py's child_quantize (load_model(float, quantize="int4") then save_model(..., source_dir=float),
     which copies the tokenizer files) to DIR/chatglm3-6b-int4 (~3.5 GB).
Each step runs in its own subprocess (step 1 here with --ensure-float, step 2 through decode.run_child), so the
benchmark's own process never holds the weights.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

SHAPES = ("chatglm3-6b",)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")     # what load.write_checkpoint copies


def int4_dir(shape: str, base: Path) -> Path:
    return base / f"{shape}-int4"                      # decode.py's folder name for glmkit-int4


def is_complete(folder: Path) -> bool:
    """save_model writes config.json after every weight file, the tokenizer files after it."""
    return all((folder / n).is_file() for n in ("config.json",) + TOKENIZER_FILES)


def ensure_float_subprocess(shape: str, base: Path) -> Path:
    """decode.ensure_float in a child process (its progress bar on our stderr); -> the float folder."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ensure-float", shape, str(base)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=4 * 3600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"writing the {shape} float checkpoint failed (exit {proc.returncode})")
    return Path(json.loads(lines[-1])["dir"])


def quantize_subprocess(float_dir: Path, q_dir: Path, spec: str = "int4") -> dict:
    """decode.py's child_quantize through decode.run_child: quantize-on-load, then save_model."""
    import decode
    r = decode.run_child("quantize", str(float_dir), str(q_dir), spec)
    if "error" in r:
        raise RuntimeError(f"quantize failed: {r['error']}")
    return r


def ensure_model(shape: str, base: Path, log=print) -> Path:
    """-> the INT4 folder for `shape`, built under `base` the first time (what it builds and how long, on log)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    q_dir = int4_dir(shape, base)
    if is_complete(q_dir):
        log(f"model: reusing {q_dir} ({shape}-shaped random INT4, official ChatGLM3 tokenizer)")
        return q_dir
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"building the {shape}-shaped random INT4 model (once; reused from {q_dir} afterwards):")
    log("  1/2 random bf16 checkpoint in the official layout (benchmarks/decode.py ensure_float; ~12.5 GB, "
        "reused when already complete) ...")
    float_dir = ensure_float_subprocess(shape, base)
    t1 = time.perf_counter()
    log(f"      {float_dir} ready in {t1 - t0:.0f} s")
    log(f"  2/2 quantize-on-load to INT4 (decode.py child_quantize) -> {q_dir} ...")
    r = quantize_subprocess(float_dir, q_dir)
    t2 = time.perf_counter()
    log(f"      quantized in {r['seconds']:.0f} s (peak RSS {r['peak_rss'] / 2**30:.2f} GiB, "
        f"{r['quantized_bytes'] / 2**30:.2f} GiB of weights); saving and process start {t2 - t1 - r['seconds']:.0f} s")
    if not is_complete(q_dir):
        raise RuntimeError(f"{q_dir} is incomplete after quantizing (no config.json or tokenizer files)")
    log(f"  built in {t2 - t0:.0f} s in all")
    return q_dir


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--ensure-float":       # child of ensure_float_subprocess
        import decode
        d = decode.ensure_float(sys.argv[2], Path(sys.argv[3]))
        print(json.dumps({"dir": str(d)}))
    else:
        sys.exit(f"usage: {sys.argv[0]} --ensure-float SHAPE DIR   (used by benchmarks/serve_load.py --shape)")
