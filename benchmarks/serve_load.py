"""Load test of `glmkit serve`: C concurrent streaming clients, unbatched (--parallel 1) vs batched (--parallel 8).

For each server setting a fresh `glmkit serve` process is started on the model (default: the tiny ChatGLM3
reference checkpoint in ../shared; any folder with --model). For each concurrency C in --clients (1, 4, 16),
C asyncio clients send streaming chat completions back to back until --requests-per-client each have finished.
Every request asks for --max-tokens tokens (greedy by default, so the work is the same in both settings;
a request may end earlier at an end-of-answer token: throughput counts the tokens actually generated).

Prints per (parallel, C): aggregate output tokens/s (all completion tokens / wall time of the whole wave),
p50/p99 time to first token, p50/p99 inter-token latency (gap between content chunks of one stream), errors;
then the ratio batched/unbatched at each C. Last line (machine-readable):
    serve_batched_vs_unbatched_c16=R errors=N

    python benchmarks/serve_load.py
    python benchmarks/serve_load.py --model ~/models/chatglm3-6b-int4 --clients 1,4 --max-tokens 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "glm" / "reference-tiny" / "chatglm3-6b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(client, url, model, prompt, max_tokens, temperature, res):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": temperature, "seed": 1,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, timeout=600) as r:
            if r.status_code != 200:
                res["errors"] += 1
                await r.aread()
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    res["errors"] += 1
                    return
                if d.get("usage"):
                    res["tokens"] += d["usage"]["completion_tokens"]
                for c in d.get("choices", []):
                    if c["delta"].get("content"):
                        now = time.perf_counter()
                        if last is None:
                            res["ttft"].append(now - t0)
                        else:
                            res["itl"].append(now - last)
                        last = now
    except Exception as e:             # connection errors count as errors, the run goes on
        res["errors"] += 1
        res.setdefault("messages", []).append(repr(e))


async def wave(base, model, clients, per_client, max_tokens, temperature):
    import httpx

    res = {"tokens": 0, "ttft": [], "itl": [], "errors": 0}
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        async def worker(i):
            for j in range(per_client):
                await one_request(client, url, model, f"第{i}位用户的第{j}个问题：请讲一个故事。", max_tokens,
                                  temperature, res)
        t = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        res["seconds"] = time.perf_counter() - t
    return res


def start_server(model, parallel, threads, extra):
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "glmkit", "serve", "--model", str(model), "--port", str(port), "--parallel",
           str(parallel), "--max-queue", "256", "--log-level", "warning"] + extra
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                model_id = httpx.get(base + "/v1/models", timeout=5).json()["data"][0]["id"]
                return proc, base, model_id
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("server did not start in 120 s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--parallel", default="1,8", help="server --parallel settings to compare (first = baseline)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--server-args", default="", help="extra arguments for glmkit serve (e.g. '-q int4')")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model} is not a model folder (the default needs ../shared/glm/reference-tiny)")
    clients = [int(c) for c in args.clients.split(",")]
    settings = [int(p) for p in args.parallel.split(",")]
    results = {}
    for par in settings:
        proc, base, model_id = start_server(args.model, par, args.threads, args.server_args.split())
        try:
            asyncio.run(wave(base, model_id, 1, 1, 8, args.temperature))           # warm-up
            for c in clients:
                r = asyncio.run(wave(base, model_id, c, args.requests_per_client, args.max_tokens,
                                     args.temperature))
                results[par, c] = r
                print(f"parallel {par:2d}  C={c:2d}: {r['tokens'] / r['seconds']:8.1f} tok/s "
                      f"({r['tokens']} tokens, {r['seconds']:.1f} s, {r['errors']} errors)", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"\nmodel: {args.model}  max_tokens {args.max_tokens}  {args.requests_per_client} requests per client  "
          f"temperature {args.temperature}  cpus {os.cpu_count()}")
    print(f"| --parallel | C | output tok/s | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) | errors |")
    print("|---|---|---|---|---|---|")
    for (par, c), r in sorted(results.items()):
        ms = lambda xs, q: pct(xs, q) * 1000
        print(f"| {par} | {c} | {r['tokens'] / r['seconds']:.1f} | {ms(r['ttft'], 50):.0f} / {ms(r['ttft'], 99):.0f} "
              f"| {ms(r['itl'], 50):.1f} / {ms(r['itl'], 99):.1f} | {r['errors']} |")
    base_p, best_p = settings[0], settings[-1]
    print()
    ratio16 = float("nan")
    for c in clients:
        a, b = results.get((base_p, c)), results.get((best_p, c))
        if a and b and a["tokens"]:
            ratio = (b["tokens"] / b["seconds"]) / (a["tokens"] / a["seconds"])
            print(f"C={c}: --parallel {best_p} / --parallel {base_p} aggregate tok/s = {ratio:.2f}x")
            if c == 16:
                ratio16 = ratio
    errors = sum(r["errors"] for r in results.values())
    print(f"serve_batched_vs_unbatched_c16={ratio16:.2f} errors={errors}")


if __name__ == "__main__":
    main()
