"""n choices in one request against the same answers asked one request at a time, and the ollama route against
the OpenAI one, through a real HTTP server (uvicorn in this process, the engine on its worker thread).

    python benchmarks/serve_choices.py [--model DIR] [--n 4] [--tokens 64] [--repeats 3]

Prints the median wall time of each way and the last line `n_speedup=... ollama_vs_openai=...`. Default model: the
ChatGLM3 tiny reference checkpoint in ../shared (a toy: the figures show scheduling, not a real model's speed).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT.parent / "shared/glm/reference-tiny/chatglm3-6b"))
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import httpx

    from _server_util import running_server

    msgs = [{"role": "user", "content": "写一首关于月亮的诗"}]
    body = {"model": Path(a.model).name, "messages": msgs, "max_tokens": a.tokens, "temperature": 1.0, "seed": 1,
            "logit_bias": {"2": -100, "64795": -100, "64797": -100}}            # never stop early: every answer is full
    with running_server(a.model, parallel=a.n) as (base, _):
        c = httpx.Client(base_url=base, timeout=600)

        cpu = {}

        def timed(fn) -> float:
            """median wall seconds; cpu[fn] the median CPU seconds of this process (server and client): on a
            loaded machine the CPU time moves less than the wall time"""
            out, used = [], []
            for _ in range(a.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                out.append(time.perf_counter() - t0)
                used.append(time.process_time() - c0)
            cpu[len(cpu)] = statistics.median(used)
            return statistics.median(out)

        c.post("/v1/chat/completions", json=body)                                  # warm-up
        one = timed(lambda: c.post("/v1/chat/completions", json={**body, "n": a.n}).raise_for_status())
        seq = timed(lambda: [c.post("/v1/chat/completions", json={**body, "seed": i}).raise_for_status()
                             for i in range(a.n)])
        opts = {"temperature": 0, "num_predict": a.tokens}
        oll = timed(lambda: c.post("/api/chat", json={"model": body["model"], "messages": msgs, "stream": False,
                                                      "options": opts}).raise_for_status())
        oai = timed(lambda: c.post("/v1/chat/completions", json={"model": body["model"], "messages": msgs,
                                                                  "temperature": 0, "max_tokens": a.tokens})
                    .raise_for_status())
    print(f"n={a.n} in one request: {one:.3f} s ({cpu[0]:.3f} CPU s); {a.n} requests one after another: {seq:.3f} s "
          f"({cpu[1]:.3f} CPU s) ({a.tokens} tokens each, median of {a.repeats})")
    print(f"greedy {a.tokens} tokens: /api/chat {oll:.3f} s ({cpu[2]:.3f} CPU s), /v1/chat/completions {oai:.3f} s "
          f"({cpu[3]:.3f} CPU s)")
    print(f"n_speedup={seq / one:.2f} n_cpu_ratio={cpu[1] / cpu[0]:.2f} ollama_vs_openai={oll / oai:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
