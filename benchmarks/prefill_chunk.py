"""How large a prefill chunk should be: prompt throughput against the stall it puts on running streams.

While a prompt joins a busy server, every decoding stream waits one prefill chunk plus one decode step for its
next token (glmkit/engine/engine.py). Small chunks keep that gap short; large chunks read prompts faster (the
quantized GEMMs reuse each weight block over more rows). This measures both on one model, in one process:
  for each --chunks size: a --prompt-tokens prompt read by the engine in chunks of that size, with --rows other
  sequences decoding beside it (as in the server): how long the prompt takes to read (wall time, decode steps
  included), and the median engine step meanwhile -- the gap between two tokens of each decoding stream (on
  the fused path a chunk rides in the decode step; elsewhere it is a chunk plus a step).
Default model: the ChatGLM3-6B-shaped random INT4 folder that benchmarks/decode.py and serve_load.py build
(/tmp/glmkit-bench/chatglm3-6b-int4; `python benchmarks/serve_load.py --shape chatglm3-6b --scenario throughput
--clients 1` builds it if missing).

    python benchmarks/prefill_chunk.py
    python benchmarks/prefill_chunk.py --model DIR --chunks 16,32,64,128,256 --rows 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/glmkit-bench/chatglm3-6b-int4"))
    ap.add_argument("--chunks", default="16,32,64,128,256")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--rows", type=int, default=7, help="sequences decoding while the prompt is read")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=2048)
    args = ap.parse_args()

    from glmkit.checkpoint import load_model
    from glmkit.cli.common import set_threads
    from glmkit.engine import Engine, Sequence
    from glmkit.quant import prepare_model
    from glmkit.sampling import SamplingParams
    import random

    set_threads(args.threads)
    model, _ = load_model(args.model)
    if model.config.quantization:
        prepare_model(model)
    rng = random.Random(0)
    V = min(model.config.vocab_size, 60000)
    eng = Engine(model, args.ctx, slots=args.rows + 1, cache_mb=0, prefill_chunk=16)
    print(f"model {args.model} ({model.config.family}, {'quantized' if model.config.quantization else model.dtype}), "
          f"decode path {eng.decode_path}, threads {args.threads or os.cpu_count()}, "
          f"prompt {args.prompt_tokens} tokens, {args.rows} rows decoding")
    print("| chunk | prompt read in s | prompt tok/s | s per step while it is read (median) = the gap a decoding "
          "stream sees |")
    print("|---|---|---|---|")
    for chunk in [int(c) for c in args.chunks.split(",")]:
        eng.prefill_chunk = chunk
        # the decoding rows: short prompts, long answers (EOS ignored: no stop ids)
        rows = [Sequence([rng.randrange(100, V) for _ in range(8)], SamplingParams(temperature=0,
                max_new_tokens=10_000)) for _ in range(args.rows)]
        for r in rows:
            eng.submit(r)
        while not all(r.decoding for r in rows):
            eng.step()
        joiner = Sequence([rng.randrange(100, V) for _ in range(args.prompt_tokens)],
                          SamplingParams(temperature=0, max_new_tokens=1))
        eng.submit(joiner)
        steps = []
        t0 = time.perf_counter()
        while joiner.finished is None:
            t = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        print(f"| {chunk} | {wall:.1f} | {args.prompt_tokens / wall:.1f} | {statistics.median(steps):.2f} |",
              flush=True)
        for r in rows:
            r.cancel()
        eng.sweep()


if __name__ == "__main__":
    main()
