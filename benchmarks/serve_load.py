"""Load test of `glmkit serve`: batched vs unbatched throughput, and multi-turn chats with the prefix cache on/off.

Every server setting gets a fresh `python -m glmkit serve` process on the model: by default the tiny ChatGLM3
reference checkpoint in ../shared (--model DIR for any folder), or with --shape chatglm3-6b a ChatGLM3-6B-shaped
INT4 model with random weights and the official ChatGLM3 tokenizer, which the benchmark builds itself the first
time (benchmarks/_serve_shapes.py: benchmarks/decode.py's ensure_float + child_quantize, each in a subprocess;
folders /tmp/glmkit-bench/chatglm3-6b-random (bf16, 12.5 GB) and --dir/chatglm3-6b-int4 (3.5 GB), the very
folders benchmarks/decode.py uses, so either benchmark reuses what the other built). All requests are streaming
chat completions with stream_options.include_usage, greedy (--temperature 0) by default, --max-tokens each (64;
with --shape the servers also get --ctx 2048); an answer may end earlier at an end-of-answer token:
throughputs count the tokens generated.
A request's TTFT is the time from sending it to its first content chunk (to its final chunk when the answer is
empty); inter-token latency (ITL) is the gap between consecutive content chunks of one stream.

Scenario "throughput": for each --parallel setting (1,8; the first is the baseline) a server, one warm-up request,
then for each C in --clients (1,4,16) a wave of C concurrent clients sending --requests-per-client requests each
(2; 1 with --shape) back to back. Per (parallel, C): aggregate output tokens/s (completion tokens of the wave /
its wall time), TTFT p50/p99, ITL p50/p99, errors; then the ratio batched/unbatched at each C.

Scenario "multiturn": --mt-clients (4) conversations of --turns (5) turns at --mt-parallel (8), once with the
server's prefix cache on (default server flags) and once off (--cache-off-args, default '--cache-mb 0'). Every
conversation starts with the same system prompt (a knowledge-base preamble of 376 characters) and grows: turn k
sends system, user 1, assistant 1 (the text the server answered), ..., user k; the user messages differ per
client and turn. Clients start staggered (client i waits i * --stagger s; 'auto' = a warm-up request's TTFT on a
prompt as long as turn 1's plus half its decode time, so a newcomer's prompt is prefilled while the others
decode) and run their turns back to back; both settings use the same stagger. Per setting and turn: mean prompt
tokens, mean usage.prompt_tokens_details.cached_tokens (absent = 0), TTFT p50/p99 over the clients. Per setting:
ITL p50/p99 of every gap of every stream, and p99 of the gaps during which another request of the run was being
prefilled (sent, no first token yet). After the cache-on run it scrapes GET /metrics and prints the
glmkit_prefill_chunk*, glmkit_decode_step_seconds* and glmkit_prefix_cache* lines, with
bound_ms = 1000 * (prefill_chunk_seconds_max + decode_step_seconds_max) (a stream's gap should not exceed one
prefill chunk plus one decode step) and bound_mean_ms from the _sum/_count means; n/a where not exposed.

Last line (machine-readable; nan where a scenario did not run or a setting failed; errors counts failed requests
and servers that did not start, all scenarios):
    serve_6b_batched_vs_unbatched_c16=R turn5_ttft_cache_speedup=R itl_p99_ms=F errors=N
  serve_6b_batched_vs_unbatched_c16  aggregate tok/s at C=16, last --parallel setting / first (the key names are
                                     fixed: the same with the tiny model)
  turn5_ttft_cache_speedup           TTFT p50 of the last turn (5 by default), prefix cache off / on
  itl_p99_ms                         p99 of all inter-token gaps of the cache-on multi-turn run

    python benchmarks/serve_load.py                                   # tiny model, both scenarios (~1-2 min)
    python benchmarks/serve_load.py --shape chatglm3-6b               # ChatGLM3-6B-shaped INT4 (see below)
    python benchmarks/serve_load.py --scenario throughput --clients 1,4 --max-tokens 32
    python benchmarks/serve_load.py --model ~/models/chatglm3-6b-int4 --scenario multiturn --mt-clients 8

How long --shape chatglm3-6b takes on 2 cores (measured 2026-12-01, AMD EPYC Zen3 AVX2): the first time ~4 min
to write the 12.5 GB bf16 folder and quantize it (~16 GB of disk in all); then each server start ~10-15 s;
throughput ~7 min (--parallel 1 at 16 clients alone ~2.5 min); multiturn ~15 min, most of it the cache-off run
(every turn re-reads its whole history at ~20 tokens/s); ~25 min in all (--mt-clients 2 or one --scenario for
less).
The multi-turn conversation is fitted to the server's context (the model's, at most --ctx or 8192): for a small
one (the tiny reference model has 256 positions) the system prompt, then the answers, are shortened (noted).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MODEL = ROOT.parent / "shared" / "glm" / "reference-tiny" / "chatglm3-6b"
sys.path.insert(0, str(HERE))

SCENARIOS = ("throughput", "multiturn")
METRIC_PREFIXES = ("glmkit_prefill_chunk", "glmkit_decode_step_seconds", "glmkit_prefix_cache")
NAN = float("nan")

SYSTEM_PROMPT = (
    "你是“星河电器”官方商城的客服助手。以下是知识库摘要，请只依据这些内容回答用户的问题。"
    "一、退换货：自签收之日起七天内，商品未使用且包装完好，可无理由退货；十五天内出现非人为的质量问题，可以换货或免费维修，"
    "退货运费由商城承担。二、保修：大家电整机保修三年，压缩机和电机等主要部件保修十年；小家电整机保修一年；保修需提供订单号。"
    "三、配送：订单满九十九元包邮，偏远地区另收运费；冰箱、洗衣机、空调等大件商品提供免费送货上门和安装，安装需提前一天预约。"
    "四、发票：支持电子普通发票和增值税专用发票，可在订单详情页申请，开票后可修改一次抬头。"
    "五、会员：每消费一元积一分，一百积分抵扣一元，积分有效期两年；金卡会员享受延长一年保修。"
    "六、人工客服：每天早上八点到晚上十点，电话四零零八八八六六六六。"
    "回答要简洁准确；知识库里没有的内容请如实说明，并建议用户联系人工客服。")
TOPICS = ("我买的冰箱用了十天就不制冷了，可以换货吗？需要准备哪些材料？",
          "洗衣机送货上门以后，安装要另外收费吗？最快什么时候能装好？",
          "我的积分快要过期了，能不能换成现金直接抵扣这次的订单？",
          "空调的压缩机坏了，已经买了四年，还在保修期内吗？",
          "电子发票开错了抬头，还能修改吗？增值税专用发票怎么申请？",
          "我住在山区，买一台九十元的电饭煲要付多少运费？",
          "金卡会员的保修期比普通会员长多少？怎样才能成为金卡会员？",
          "晚上十一点还能联系到人工客服吗？有没有别的办法处理退货？")


def user_message(client: int, turn: int) -> str:
    return f"第{client}位用户的第{turn}个问题：{TOPICS[(client * 3 + turn) % len(TOPICS)]}请分点说明。"


# ChatGLM3 tokenizer, measured: the system prompt ~0.7 tokens per character (376 -> 264), a user message with its
# role tokens ~34, an assistant turn its answer + ~2 (re-tokenizing a random model's text may give more: x1.25)
SERVER_DEFAULT_CTX = 8192                     # glmkit serve's context unless --ctx (capped by the model's)
USER_TOKENS, ANSWER_SLACK, TEMPLATE_TOKENS, SYSTEM_TOKENS_PER_CHAR = 34, 1.25, 16, 0.75


def model_context(model: Path, ctx_arg) -> int | None:
    try:
        cfg = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return None
    limit = next((cfg[k] for k in ("seq_length", "max_seq_len", "max_position_embeddings") if cfg.get(k)), None)
    want = ctx_arg or SERVER_DEFAULT_CTX
    return min(want, limit) if limit else want


def fit_conversation(ctx: int | None, turns: int, max_tokens: int) -> tuple[str, int, str | None]:
    """-> (system prompt, max_tokens, note): shorten the system prompt, then the answers, so that the last turn's
    prompt and answer fit the server's context (a small model such as the tiny reference one has 256 positions)."""
    def need(mt):                            # every token but the system prompt's, the last answer included
        return TEMPLATE_TOKENS + turns * USER_TOKENS + (turns - 1) * (math.ceil(ANSWER_SLACK * mt) + 2) + mt
    full = math.ceil(SYSTEM_TOKENS_PER_CHAR * len(SYSTEM_PROMPT))
    if ctx is None or need(max_tokens) + full <= ctx:
        return SYSTEM_PROMPT, max_tokens, None
    least = 24                               # tokens of system prompt kept at least
    mt = max_tokens
    while mt > 1 and need(mt) + least > ctx:
        mt -= 1
    chars = max(1, int((ctx - need(mt)) / SYSTEM_TOKENS_PER_CHAR)) if need(mt) + least <= ctx else 32
    chars = min(chars, len(SYSTEM_PROMPT))
    note = (f"the server's context ({ctx} tokens) is too small for {turns} turns with the full system prompt "
            f"and {max_tokens}-token answers: system prompt cut to {chars} characters"
            + (f", answers to {mt} tokens" if mt != max_tokens else ""))
    if need(mt) + least > ctx:
        note += "; the last turns may still not fit (HTTP 400, counted as errors)"
    return SYSTEM_PROMPT[:chars], mt, note


# ------------------------------------------------------------------------------------------------------------
# server processes
# ------------------------------------------------------------------------------------------------------------

class ServerFailed(RuntimeError):
    pass


class Server:
    """A `glmkit serve` subprocess; stderr goes to a temporary file (a pipe nobody reads could fill and block it)."""

    def __init__(self, model: Path, parallel: int, threads, ctx, extra: list[str], start_timeout: float):
        import httpx

        port = free_port()
        cmd = [sys.executable, "-m", "glmkit", "serve", "--model", str(model), "--port", str(port), "--parallel",
               str(parallel), "--max-queue", "256", "--log-level", "warning"]
        if threads:
            cmd += ["--threads", str(threads)]
        if ctx:
            cmd += ["--ctx", str(ctx)]
        cmd += extra
        self.cmd = cmd
        self.log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.base = f"http://127.0.0.1:{port}"
        t = time.perf_counter()
        while time.perf_counter() - t < start_timeout:
            if self.proc.poll() is not None:
                msg = f"server exited at start (code {self.proc.returncode}): {self.stderr_tail()}"
                self.__exit__()
                raise ServerFailed(msg)
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    self.model_id = httpx.get(self.base + "/v1/models", timeout=10).json()["data"][0]["id"]
                    self.start_seconds = time.perf_counter() - t
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        msg = f"server did not answer /health within {start_timeout:.0f} s: {self.stderr_tail()}"
        self.__exit__()
        raise ServerFailed(msg)

    def stderr_tail(self, n: int = 800) -> str:
        try:
            self.log.seek(0)
            text = self.log.read()
        except (OSError, ValueError):
            return "(no stderr)"
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        return " | ".join(lines[-4:])[-n:] or "(no stderr)"

    def metrics_text(self) -> str | None:
        import httpx
        try:
            r = httpx.get(self.base + "/metrics", timeout=10)
            return r.text if r.status_code == 200 else None
        except httpx.HTTPError:
            return None

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, q):
    if not xs:
        return NAN
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1f}"


def mean_str(xs) -> str:
    return f"{sum(xs) / len(xs):.0f}" if xs else "n/a"


def ms(x: float, digits: int = 0) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x * 1000:.{digits}f}"


# ------------------------------------------------------------------------------------------------------------
# one streaming chat completion
# ------------------------------------------------------------------------------------------------------------

async def stream_chat(client, base, model, messages, max_tokens, temperature) -> dict:
    """-> {ok, error, text, t0, t_first, times (content chunk arrival times), completion_tokens, prompt_tokens,
    cached_tokens}; a failure (HTTP status, error event, connection) gives ok False and its message."""
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens,
            "temperature": temperature, "seed": 1, "stream_options": {"include_usage": True}}
    r = {"ok": False, "error": None, "text": "", "t0": time.perf_counter(), "t_first": None, "times": [],
         "completion_tokens": 0, "prompt_tokens": None, "cached_tokens": 0}
    parts = []
    try:
        async with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=1800) as resp:
            if resp.status_code != 200:
                r["error"] = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in d:
                    r["error"] = f"error event: {json.dumps(d['error'], ensure_ascii=False)[:200]}"
                    return r
                u = d.get("usage")
                if u:
                    r["completion_tokens"] = u.get("completion_tokens") or 0
                    r["prompt_tokens"] = u.get("prompt_tokens")
                    r["cached_tokens"] = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                for c in d.get("choices") or []:
                    text = (c.get("delta") or {}).get("content")
                    if text:
                        parts.append(text)
                        r["times"].append(now)
                        if r["t_first"] is None:
                            r["t_first"] = now
                    elif c.get("finish_reason") and r["t_first"] is None:
                        r["t_first"] = now                                  # an empty answer: its end
        r["ok"] = True
    except Exception as e:                  # connection errors count as errors, the run goes on
        r["error"] = repr(e)[:200]
    r["text"] = "".join(parts)
    return r


def ttft(r) -> float | None:
    return None if r["t_first"] is None else r["t_first"] - r["t0"]


def gaps(r) -> list[float]:
    t = r["times"]
    return [b - a for a, b in zip(t, t[1:])]


def http_client(n: int):
    import httpx
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    return httpx.AsyncClient(limits=limits)


# ------------------------------------------------------------------------------------------------------------
# scenario "throughput"
# ------------------------------------------------------------------------------------------------------------

async def wave(base, model, clients, per_client, max_tokens, temperature) -> dict:
    reqs = []
    async with http_client(clients) as client:
        async def worker(i):
            for j in range(per_client):
                msgs = [{"role": "user", "content": f"第{i}位用户的第{j}个问题：请讲一个故事。"}]
                reqs.append(await stream_chat(client, base, model, msgs, max_tokens, temperature))
        t = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        seconds = time.perf_counter() - t
    ok = [r for r in reqs if r["ok"]]
    return {"seconds": seconds, "tokens": sum(r["completion_tokens"] for r in ok),
            "ttft": [ttft(r) for r in ok if ttft(r) is not None], "itl": [g for r in ok for g in gaps(r)],
            "errors": len(reqs) - len(ok), "messages": [r["error"] for r in reqs if not r["ok"]]}


def run_throughput(args, model: Path, note) -> dict:
    clients = [int(c) for c in args.clients.split(",")]
    settings = [int(p) for p in args.parallel.split(",")]
    results, failed = {}, {}
    for par in settings:
        print(f"[throughput] starting server --parallel {par} ...", flush=True)
        try:
            srv = Server(model, par, args.threads, args.ctx, args.server_args.split(), args.start_timeout)
        except ServerFailed as e:
            failed[par] = str(e)
            note(f"[throughput] --parallel {par}: {e}")
            continue
        with srv:
            print(f"[throughput] server up in {srv.start_seconds:.1f} s", flush=True)
            asyncio.run(wave(srv.base, srv.model_id, 1, 1, 8, args.temperature))          # warm-up
            for c in clients:
                r = asyncio.run(wave(srv.base, srv.model_id, c, args.requests_per_client, args.max_tokens,
                                     args.temperature))
                results[par, c] = r
                print(f"[throughput] parallel {par:2d}  C={c:2d}: {r['tokens'] / r['seconds']:8.1f} tok/s "
                      f"({r['tokens']} tokens, {r['seconds']:.1f} s, {r['errors']} errors)", flush=True)
                for m in r["messages"][:3]:
                    note(f"[throughput] parallel {par} C={c}: {m}")
    print(f"\n### throughput: model {model.name}, max_tokens {args.max_tokens}, {args.requests_per_client} "
          f"request(s) per client, temperature {args.temperature}, cpus {os.cpu_count()}\n")
    print("| --parallel | C | output tok/s | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) | errors |")
    print("|---|---|---|---|---|---|")
    for (par, c), r in sorted(results.items()):
        print(f"| {par} | {c} | {r['tokens'] / r['seconds']:.1f} | {ms(pct(r['ttft'], 50))} / {ms(pct(r['ttft'], 99))} "
              f"| {ms(pct(r['itl'], 50), 1)} / {ms(pct(r['itl'], 99), 1)} | {r['errors']} |")
    for par, msg in failed.items():
        print(f"| {par} | - | server failed | | | 1 |")
    base_p, best_p = settings[0], settings[-1]
    print()
    ratio16 = NAN
    for c in clients:
        a, b = results.get((base_p, c)), results.get((best_p, c))
        if a and b and a["tokens"] and a["seconds"] and b["seconds"]:
            ratio = (b["tokens"] / b["seconds"]) / (a["tokens"] / a["seconds"])
            print(f"C={c}: --parallel {best_p} / --parallel {base_p} aggregate tok/s = {ratio:.2f}x")
            if c == 16:
                ratio16 = ratio
        else:
            print(f"C={c}: --parallel {best_p} / --parallel {base_p}: n/a")
    errors = sum(r["errors"] for r in results.values()) + len(failed)
    return {"ratio16": ratio16, "errors": errors}


# ------------------------------------------------------------------------------------------------------------
# scenario "multiturn"
# ------------------------------------------------------------------------------------------------------------

async def conversations(base, model, system, n, turns, max_tokens, temperature, stagger) -> dict:
    """n staggered clients, `turns` turns each, growing history; -> {"turns": {k: [result, ...]}, "all": [...]}."""
    per_turn: dict[int, list[dict]] = {k: [] for k in range(1, turns + 1)}
    every: list[dict] = []
    async with http_client(n) as client:
        async def conversation(i):
            await asyncio.sleep(i * stagger)
            msgs = [{"role": "system", "content": system}]
            for k in range(1, turns + 1):
                msgs.append({"role": "user", "content": user_message(i, k)})
                r = await stream_chat(client, base, model, list(msgs), max_tokens, temperature)
                r["client"], r["turn"] = i, k
                per_turn[k].append(r)
                every.append(r)
                if not r["ok"]:
                    return                          # the conversation cannot go on without its answer
                msgs.append({"role": "assistant", "content": r["text"]})
        t = time.perf_counter()
        await asyncio.gather(*(conversation(i) for i in range(n)))
        seconds = time.perf_counter() - t
    return {"turns": per_turn, "all": every, "seconds": seconds}


def gaps_while_others_prefill(every: list[dict]) -> list[float]:
    """Gaps of a stream that overlap the prefill (sent .. first token) of another request of the run."""
    windows = [(r["t0"], r["t_first"] if r["t_first"] is not None else r["t0"], id(r)) for r in every]
    out = []
    for r in every:
        t = r["times"]
        for a, b in zip(t, t[1:]):
            if any(w0 < b and a < w1 for w0, w1, rid in windows if rid != id(r)):
                out.append(b - a)
    return out


def parse_metrics(text: str) -> tuple[list[str], dict[str, float]]:
    """-> (sample lines whose names start with METRIC_PREFIXES, {name: value} of unlabelled samples)."""
    lines, values = [], {}
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(None, 1)[0]
        if not name.startswith(METRIC_PREFIXES):
            continue
        lines.append(line)
        try:
            v = float(line.rsplit(None, 1)[1])
        except (ValueError, IndexError):
            continue
        if "{" not in line.split(None, 1)[0] and name not in values:
            values[name] = v
    return lines, values


def latency_bound(values: dict[str, float]) -> tuple[float, float]:
    """-> (bound_ms, bound_mean_ms), nan where the metrics are missing."""
    g = values.get
    c, s = "glmkit_prefill_chunk_seconds", "glmkit_decode_step_seconds"
    bound = NAN
    if g(c + "_max") is not None and g(s + "_max") is not None:
        bound = 1000 * (g(c + "_max") + g(s + "_max"))
    mean = NAN
    if g(c + "_count") and g(s + "_count") and g(c + "_sum") is not None and g(s + "_sum") is not None:
        mean = 1000 * (g(c + "_sum") / g(c + "_count") + g(s + "_sum") / g(s + "_count"))
    return bound, mean


def auto_stagger(warm: dict, max_tokens: int) -> float:
    """A newcomer should arrive while the earlier clients decode: TTFT of a turn-1-sized prompt + half its decode."""
    g = gaps(warm)
    first = ttft(warm) or 0.0
    step = sorted(g)[len(g) // 2] if g else 0.0
    return max(0.05, first + 0.5 * step * max(1, max_tokens - 1))


def run_multiturn(args, model: Path, note) -> dict:
    settings = [("on", []), ("off", args.cache_off_args.split())]
    stagger = None if args.stagger == "auto" else float(args.stagger)
    ctx = model_context(model, args.ctx)
    system, max_tokens, fit_note = fit_conversation(ctx, args.turns, args.max_tokens)
    if fit_note:
        note(f"[multiturn] {fit_note}")
    runs, failed, mt_metrics = {}, {}, None
    for name, extra in settings:
        print(f"[multiturn] starting server --parallel {args.mt_parallel}, prefix cache {name}"
              f"{' (' + ' '.join(extra) + ')' if extra else ''} ...", flush=True)
        try:
            srv = Server(model, args.mt_parallel, args.threads, args.ctx, args.server_args.split() + extra,
                         args.start_timeout)
        except ServerFailed as e:
            failed[name] = str(e)
            note(f"[multiturn] prefix cache {name}: {e}")
            continue
        with srv:
            print(f"[multiturn] server up in {srv.start_seconds:.1f} s", flush=True)
            # warm-up: as long as turn 1 but sharing no prefix with the conversations (the cache stays cold)
            warm = asyncio.run(conversations_warmup(srv.base, srv.model_id, system, max_tokens, args.temperature))
            if not warm["ok"]:
                note(f"[multiturn] cache {name} warm-up: {warm['error']}")
            if stagger is None:
                stagger = auto_stagger(warm, max_tokens) if warm["ok"] else 1.0
                print(f"[multiturn] stagger {stagger:.2f} s (warm-up: TTFT {ms(ttft(warm) or NAN)} ms, "
                      f"{len(warm['times'])} chunks)", flush=True)
            r = asyncio.run(conversations(srv.base, srv.model_id, system, args.mt_clients, args.turns, max_tokens,
                                          args.temperature, stagger))
            if name == "on":
                mt_metrics = srv.metrics_text()
            runs[name] = r
            errs = [x for x in r["all"] if not x["ok"]]
            print(f"[multiturn] prefix cache {name}: {len(r['all']) - len(errs)} answers in {r['seconds']:.1f} s, "
                  f"{len(errs)} errors", flush=True)
            for x in errs[:3]:
                note(f"[multiturn] cache {name} client {x['client']} turn {x['turn']}: {x['error']}")

    print(f"\n### multiturn: model {model.name}, {args.mt_clients} clients x {args.turns} turns, --parallel "
          f"{args.mt_parallel}, max_tokens {max_tokens}, stagger {stagger if stagger is not None else NAN:.2f} s, "
          f"temperature {args.temperature}, system prompt {len(system)} characters, context {ctx}\n")
    print("| prefix cache | turn | answers | prompt tokens (mean) | cached tokens (mean) | TTFT p50 / p99 (ms) "
          "| errors |")
    print("|---|---|---|---|---|---|---|")
    p50_last = {}
    for name, _ in settings:
        if name in failed:
            print(f"| {name} | - | server failed | | | | 1 |")
            continue
        r = runs[name]
        for k in range(1, args.turns + 1):
            rs = r["turns"][k]
            ok = [x for x in rs if x["ok"]]
            tt = [ttft(x) for x in ok if ttft(x) is not None]
            pt = [x["prompt_tokens"] for x in ok if x["prompt_tokens"] is not None]
            ct = [x["cached_tokens"] for x in ok]
            print(f"| {name} | {k} | {len(ok)} | {mean_str(pt)} | {mean_str(ct)} "
                  f"| {ms(pct(tt, 50))} / {ms(pct(tt, 99))} | {len(rs) - len(ok)} |")
            if k == args.turns:
                p50_last[name] = pct(tt, 50)
    print()
    print("| prefix cache | wall s | output tok/s | inter-token p50 / p99 (ms) "
          "| p99 while another request prefills (ms) |")
    print("|---|---|---|---|---|")
    itl = {}
    for name, _ in settings:
        if name not in runs:
            continue
        r = runs[name]
        ok = [x for x in r["all"] if x["ok"]]
        g = [d for x in ok for d in gaps(x)]
        gj = gaps_while_others_prefill(ok)
        itl[name] = g
        toks = sum(x["completion_tokens"] for x in ok)
        print(f"| {name} | {r['seconds']:.1f} | {toks / r['seconds']:.1f} | {ms(pct(g, 50), 1)} / {ms(pct(g, 99), 1)} "
              f"| {ms(pct(gj, 99), 1)} ({len(gj)} of {len(g)} gaps) |")

    itl_p99 = pct(itl["on"], 99) * 1000 if "on" in itl else NAN
    if "on" in runs:
        lines, values = parse_metrics(mt_metrics)
        print(f"\nGET /metrics after the cache-on run ({len(lines)} matching lines"
              f"{'' if mt_metrics is not None else '; /metrics did not answer'}):")
        for line in lines:
            print(f"    {line}")
        if not lines:
            print(f"    n/a (no {', '.join(p + '*' for p in METRIC_PREFIXES)})")
        bound, bound_mean = latency_bound(values)
        verdict = "n/a" if math.isnan(bound) or math.isnan(itl_p99) else ("yes" if itl_p99 <= bound else "NO")
        print(f"bound_ms={num(bound)} (longest prefill chunk + longest decode step)  "
              f"bound_mean_ms={num(bound_mean)}  itl_p99_ms={num(itl_p99)}  itl_p99_ms <= bound_ms: {verdict}")
    if "off" in runs and args.turns > 1:
        later = [x["cached_tokens"] for k in range(2, args.turns + 1) for x in runs["off"]["turns"][k] if x["ok"]]
        if later and sum(later) > 0:
            note(f"[multiturn] with the prefix cache off the server still reported cached tokens on turns 2-"
                 f"{args.turns} (mean {sum(later) / len(later):.0f}): it reuses a slot's own KV for the next turn, "
                 f"so the speedup compares the prefix cache with that slot reuse, not with no reuse")
    speedup = NAN
    if "on" in p50_last and "off" in p50_last and p50_last["on"] and not math.isnan(p50_last["on"]):
        speedup = p50_last["off"] / p50_last["on"]
        print(f"turn {args.turns} TTFT p50: cache off {ms(p50_last['off'])} ms / on {ms(p50_last['on'])} ms "
              f"= {speedup:.2f}x")
    else:
        print(f"turn {args.turns} TTFT cache speedup: n/a (needs both settings)")
    errors = len(failed) + sum(1 for r in runs.values() for x in r["all"] if not x["ok"])
    return {"speedup": speedup, "itl_p99_ms": itl_p99, "errors": errors}


async def conversations_warmup(base, model, system, max_tokens, temperature) -> dict:
    """Turn 1's size (the system prompt reversed: no shared prefix, so the prefix cache stays cold)."""
    async with http_client(1) as client:
        msgs = [{"role": "system", "content": "".join(reversed(system))},
                {"role": "user", "content": user_message(99, 1)}]
        return await stream_chat(client, base, model, msgs, max_tokens, temperature)


# ------------------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help=f"model folder (default {DEFAULT_MODEL})")
    ap.add_argument("--shape", default=None, choices=["chatglm3-6b"],
                    help="instead of --model: a random-weight INT4 model of this shape, built under --dir once")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/glmkit-bench"),
                    help="where --shape's INT4 folder lives (shared with benchmarks/decode.py)")
    ap.add_argument("--scenario", default="throughput,multiturn", help="comma list of " + ", ".join(SCENARIOS))
    ap.add_argument("--clients", default="1,4,16", help="[throughput] concurrent clients per wave")
    ap.add_argument("--parallel", default="1,8", help="[throughput] server --parallel settings (first = baseline)")
    ap.add_argument("--requests-per-client", type=int, default=None, help="[throughput] (default 2; 1 with --shape)")
    ap.add_argument("--mt-clients", type=int, default=4, help="[multiturn] conversations")
    ap.add_argument("--turns", type=int, default=5, help="[multiturn] turns per conversation")
    ap.add_argument("--mt-parallel", type=int, default=8, help="[multiturn] server --parallel")
    ap.add_argument("--stagger", default="auto", help="[multiturn] seconds between client starts, or auto")
    ap.add_argument("--cache-off-args", default="--cache-mb 0",
                    help="[multiturn] server arguments that turn the prefix cache off")
    ap.add_argument("--max-tokens", type=int, default=None, help="per request (default 64)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None, help="server --threads (default: its own, all cores)")
    ap.add_argument("--ctx", type=int, default=None, help="server --ctx (default: the server's; 2048 with --shape)")
    ap.add_argument("--server-args", default="", help="extra arguments for every glmkit serve (e.g. '-q int4')")
    ap.add_argument("--start-timeout", type=float, default=None,
                    help="seconds a server may take to answer /health (default 120; 900 with --shape)")
    args = ap.parse_args()

    scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad or not scenarios:
        sys.exit(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
    big = args.shape is not None
    if big and args.model is not None:
        sys.exit("give --model or --shape, not both")
    for name, small, large in (("max_tokens", 64, 64), ("requests_per_client", 2, 1), ("start_timeout", 120, 900),
                               ("ctx", None, 2048)):
        if getattr(args, name) is None:
            setattr(args, name, large if big else small)
    if args.stagger != "auto":
        try:
            float(args.stagger)
        except ValueError:
            sys.exit(f"--stagger takes seconds or auto, not {args.stagger!r}")

    if big:
        import _serve_shapes
        try:
            model = _serve_shapes.ensure_model(args.shape, args.dir, log=lambda s: print(s, flush=True))
        except Exception as e:
            sys.exit(f"could not build the {args.shape} model: {e}")
    else:
        model = args.model or DEFAULT_MODEL
        if not (model / "config.json").is_file():
            sys.exit(f"{model} is not a model folder (the default needs ../shared/glm/reference-tiny)")

    notes: list[str] = []

    def note(s: str):
        notes.append(s)
        print(s, flush=True)

    tp = run_throughput(args, model, note) if "throughput" in scenarios else {"ratio16": NAN, "errors": 0}
    mt = (run_multiturn(args, model, note) if "multiturn" in scenarios
          else {"speedup": NAN, "itl_p99_ms": NAN, "errors": 0})
    if notes:
        print("\nproblems:")
        for s in notes:
            print(f"  {s}")
    errors = tp["errors"] + mt["errors"]
    print(f"serve_6b_batched_vs_unbatched_c16={tp['ratio16']:.2f} turn5_ttft_cache_speedup={mt['speedup']:.2f} "
          f"itl_p99_ms={mt['itl_p99_ms']:.1f} errors={errors}")


if __name__ == "__main__":
    main()
