"""The HTTP edge: OpenAI-compatible routes, ChatGLM's legacy route, metrics and the web chat page.

Handlers parse and validate the request, render the chat template and tokenize, then hand the engine
(glmkit/engine, many slots, its own worker thread) a Sequence; its token ids come back through an asyncio queue
and become text here (ResponseParser: content + tool calls; StopStringFilter: `stop`). The model is touched by
the engine's thread only.
Knowledge bases (--kb): kb_routes.py (chat with "knowledge_base", files, search, embeddings).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import store
from ..chat_format import ChatFormatError, Prompt, render_within
from ..engine import Engine, QueueFull, Sequence
from ..pipeline import MASK_TEXT, AnswerText, InfillPlan, Pipeline, logprob_entry
from ..sampling import SamplingParams
from . import choices, kb_routes, ollama, schemas, structured, tokens
from .access import Access
from .metrics import Metrics
from .schemas import APIError

log = logging.getLogger("glmkit.server")


@dataclass
class ServerSettings:
    model_id: str
    api_key: Optional[str] = None
    parallel: int = 4
    max_queue: int = 64
    request_timeout: float = 600.0          # seconds from arrival; then the answer ends with "length"
    max_body_bytes: int = 4 << 20
    retry_after: int = 2                    # seconds, in 429 answers
    cache_mb: Optional[float] = None        # prefix cache budget (None: the engine's default; 0: off)
    prefill_chunk: Optional[int] = None     # prompt tokens per prefill step (None: the engine's default)
    trim_history: bool = False              # drop the oldest turns of a chat that does not fit (else 400)
    adapters: tuple = ()                    # LoRA adapters of the model served beside it, by name (= model id)
    knowledge_bases: tuple = ()             # KB directories (--kb), served by their directories' names
    kb_max_upload_bytes: int = 50 << 20     # largest upload into a KB (--kb-max-upload-mb; larger: HTTP 413)
    kb_embedder: Any = None                 # an embedder (.name, .encode) used by every KB instead of its own model
    access: Any = None                      # access.Access (keys, key file, rate limit); None: from api_key
    max_n: int = choices.MAX_N              # most choices (`n`) one request may ask for


# ------------------------------------------------------------------------------------------------------------
# ASGI edge: body size limit (413) and per-endpoint status counts for /metrics
# ------------------------------------------------------------------------------------------------------------

class _Edge:
    def __init__(self, app, limit: int, metrics: Metrics, upload_limit: int = 0):
        self.app, self.limit, self.metrics, self.upload_limit = app, limit, metrics, upload_limit

    def _limit(self, scope) -> tuple:
        """(bytes, the 413's message) for this request: KB uploads have their own limit."""
        if self.upload_limit and scope.get("method") == "POST" and kb_routes.UPLOAD_PATH.match(scope.get("path", "")):
            return (self.upload_limit + kb_routes.MULTIPART_OVERHEAD,
                    f"the upload exceeds {self.upload_limit / 2**20:g} MB (--kb-max-upload-mb)")
        return self.limit, f"request body exceeds {self.limit} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = {"code": 0}

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        headers = dict(scope.get("headers") or [])
        cl = headers.get(b"content-length")
        limit, message = self._limit(scope)
        too_big = False
        if cl is not None:
            try:
                too_big = int(cl) > limit
            except ValueError:
                too_big = False
        if too_big:
            await self._413(send_wrapped, message, ollama.is_ollama_path(path))
        else:
            seen = {"n": 0}

            async def receive_limited():
                msg = await receive()
                if msg["type"] == "http.request":
                    seen["n"] += len(msg.get("body", b""))
                    if seen["n"] > limit:
                        raise APIError(413, message, code="request_too_large")
                return msg

            await self.app(scope, receive_limited, send_wrapped)
        if path in ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/api/chat",
                    "/api/generate"):
            self.metrics.request(path, status["code"])

    async def _413(self, send, message: str, ollama_shape: bool = False):
        err = APIError(413, message, code="request_too_large")
        body = json.dumps({"error": message} if ollama_shape else err.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------------------

def create_app(pipe: Pipeline, settings: ServerSettings) -> FastAPI:
    metrics = Metrics()
    engine = Engine(pipe.model, pipe.ctx, slots=settings.parallel, max_queue=settings.max_queue,
                    cache_mb=settings.cache_mb, prefill_chunk=settings.prefill_chunk, ptuning=pipe.ptuning)
    tok, fmt = pipe.tokenizer, pipe.chat_format
    started = int(time.time())
    kbs = kb_routes.KBRegistry(settings.knowledge_bases, settings.kb_embedder, settings.kb_max_upload_bytes)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()
        kbs.close()

    app = FastAPI(title="glmkit", version="0.1.0", lifespan=lifespan,
                  description=f"OpenAI-compatible server for {settings.model_id}")
    app.state.engine, app.state.metrics, app.state.settings, app.state.pipe = engine, metrics, settings, pipe
    app.state.knowledge_bases = kbs

    # --- errors: always OpenAI's shape ------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                      str(exc.detail))
        if ollama.is_ollama_path(request.url.path):          # ollama's routes answer in ollama's shape
            return JSONResponse({"error": msg}, status_code=exc.status_code)
        return JSONResponse(APIError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None)
                            .body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    access = settings.access or Access.of(settings.api_key)

    def auth(request: Request):
        access.check(request)                   # 401 / 429 (access.py: keys, key file, --rate-limit)

    served = [settings.model_id, *settings.adapters]

    def held_models() -> list[dict]:
        """What this server holds (store.held: generation, size on disk, quantization); also for /api/tags."""
        adapters = {a: getattr(pipe, "named_adapters", {}).get(a) for a in settings.adapters}
        return store.held(settings.model_id, pipe.path, {k: v for k, v in adapters.items() if v} or None) + \
            [{"id": a, "name": a, "parent": settings.model_id} for a, v in adapters.items() if not v]

    app.state.held_models = held_models

    def check_model(name: str) -> Optional[str]:
        """The request's model id -> the LoRA adapter that answers it (None: the model as loaded)."""
        if name == settings.model_id:
            return None
        if name in settings.adapters:
            return name
        raise APIError(404, f"the model '{name}' does not exist; this server serves {', '.join(map(repr, served))}",
                       param="model", code="model_not_found")

    def sampling(r, max_tokens, max_tokens_param="max_tokens") -> SamplingParams:
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param=max_tokens_param,
                           code="invalid_value")
        choices.check_n(r.n, settings.max_n)
        choices.check_max_tokens(max_tokens, pipe.ctx, max_tokens_param)
        bias = choices.logit_bias(r.logit_bias, pipe.config.vocab_size)
        stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop sequences", param="stop", code="invalid_value")
        try:
            return pipe.sampling_params(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=r.seed,
                                        repetition_penalty=r.repetition_penalty,
                                        presence_penalty=r.presence_penalty,
                                        frequency_penalty=r.frequency_penalty, max_tokens=max_tokens,
                                        stop=tuple(stop), logit_bias=bias)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), code="invalid_value") from None

    def check_length(n: int, param: str = "messages"):
        if n >= pipe.ctx:
            raise APIError(400, f"the prompt has {n} tokens, but the context of this server is {pipe.ctx} tokens "
                                f"(at least one position is needed for the answer)", param=param,
                           code="context_length_exceeded")

    def submit(ids, params, constraint=None, logprobs=None, adapter=None, state=None,
               stop_ids=None) -> tuple[Sequence, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            loop.call_soon_threadsafe(q.put_nowait, ev)

        ereq = Sequence(ids, params, fmt.stop_ids if stop_ids is None else stop_ids, emit, constraint=constraint,
                        logprobs=logprobs, deadline=time.monotonic() + settings.request_timeout, adapter=adapter,
                        state=state)
        try:
            engine.submit(ereq)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", code="queue_full",
                           headers={"Retry-After": str(settings.retry_after)}) from None
        return ereq, q

    async def run(request: Request, ereq: Sequence, q: asyncio.Queue, ans: AnswerText,
                  watch_disconnect: bool) -> AsyncIterator[tuple]:
        """Worker events -> ("text", piece, [logprob entries]) / ("tool", event) / ("end", reason) items."""
        pending_lp: list = []
        reason = None
        try:
            while True:
                if watch_disconnect:
                    try:
                        ev = await asyncio.wait_for(q.get(), 0.25)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            ereq.cancel()
                            return
                        continue
                else:
                    ev = await q.get()
                if ev[0] == "token":
                    _, tid, lp = ev
                    if lp is not None:
                        pending_lp.append(logprob_entry(tok, tid, *lp))
                    piece = ans.feed(tid)             # '' after a stop string (tokens before the cancel lands)
                    for e in ans.tool_events():
                        yield ("tool", e)
                    if piece:
                        yield ("text", piece, pending_lp)
                        pending_lp = []
                    if ans.stopped:
                        ereq.cancel()
                elif ev[0] == "error":
                    raise APIError(500, ev[1], code="inference_error")
                else:                                   # done
                    reason = ev[1]
                    break
            if not ans.stopped:
                piece = ans.finish()
                for e in ans.tool_events():
                    yield ("tool", e)
                if piece or pending_lp:
                    yield ("text", piece, pending_lp)
                    pending_lp = []
            if ans.tool_calls:
                reason = "tool_calls"
            elif ans.stopped or reason == "cancelled":
                reason = "stop"
            yield ("end", reason, pending_lp)
        finally:
            ereq.cancel()                               # a no-op once finished; frees the slot otherwise
            if ereq.finished or ereq.stats.new_tokens:
                metrics.finished(ereq.stats)

    async def collect(request: Request, ereq: Sequence, q: asyncio.Queue,
                      ans: AnswerText) -> tuple[str, list, str]:
        """A non-streaming answer: (text, logprob entries, finish_reason); a client that hangs up cancels it."""
        text, lps, reason = [], [], "stop"
        async for item in run(request, ereq, q, ans, watch_disconnect=True):
            if item[0] == "text":
                text.append(item[1])
                lps += item[2]
            elif item[0] == "end":
                reason = item[1]
                lps += item[2]
        return "".join(text), lps, reason

    def event_stream(chunks: AsyncIterator[str], ereqs: list, usage_chunk) -> StreamingResponse:
        """SSE answer: the route's chunks, then (include_usage) the usage chunk of all its choices (ereqs), then
        [DONE]; an inference error mid-stream becomes an error chunk."""
        async def body():
            try:
                async for c in chunks:
                    yield c
                if usage_chunk is not None:
                    yield sse({**usage_chunk, "usage": choices.usage([e.stats for e in ereqs])})
            except APIError as e:
                yield sse(e.body())
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def submit_n(n: int, ids, params, constraint_of, logprobs, adapter) -> list:
        """n choices of one prompt -> [(Sequence, queue)], each with its own seed (choices.derive_seed) and
        constraint (constraint_of(): a fresh one, or None); all or none are submitted."""
        out = []
        try:
            for i in range(n):
                out.append(submit(ids, choices.for_choice(params, i), constraint_of(), logprobs, adapter))
        except APIError:
            for e, _ in out:
                e.cancel()
            raise
        return out

    # --- routes -----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "slots": settings.parallel,
                "active": engine.active_count, "queue": engine.queue_depth}

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [_openai_model(h, started, pipe.ctx) for h in held_models()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str, request: Request):
        auth(request)
        check_model(model_id)
        return {"id": model_id, "object": "model", "created": started, "owned_by": "glmkit", "context_length": pipe.ctx}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine, settings.parallel), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def web_page():
        from importlib import resources
        try:
            html = (resources.files("glmkit.server") / "web" / "index.html").read_text(encoding="utf-8")
        except (FileNotFoundError, OSError):
            html = "<!doctype html><title>glmkit</title><p>The web page is not installed with this package.</p>"
        return HTMLResponse(html)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        auth(request)
        r = schemas.parse(schemas.ChatRequest, await request.body())
        adapter = check_model(r.model)
        include_usage = bool((r.stream_options or {}).get("include_usage"))
        kbq = kbc = None
        if kb_routes.wants_kb(r):               # answered from a knowledge base: the prompt holds its chunks
            r, kbq = kb_routes.kb_query(kbs, r)
        if r.max_completion_tokens is not None:
            params = sampling(r, r.max_completion_tokens, "max_completion_tokens")
        else:
            params = sampling(r, r.max_tokens)
        if kbq is not None:
            kbc = await kbq.prepare(pipe, params.max_new_tokens)
            if kbc.messages is None:
                return kb_routes.refusal(r, kbc, include_usage, sse)
        tools, tool_choice = r.tools, r.tool_choice
        if tools is None and r.functions:                                  # legacy functions API
            tools = [{"type": "function", "function": f} for f in r.functions]
            fc = r.function_call
            tool_choice = {"type": "function", "function": fc} if isinstance(fc, dict) else fc
        messages = kbc.messages if kbc else [m.model_dump(exclude_none=True) for m in r.messages]
        structured.validate_tools(tools, tool_choice)
        try:
            if settings.trim_history:               # as the Pipeline: drop the oldest turns that do not fit
                prompt = render_within(fmt, messages, pipe.prompt_budget(params), tools=tools,
                                       tool_choice=tool_choice)
            else:
                prompt = fmt.render(messages, tools=tools, tool_choice=tool_choice)
        except ChatFormatError as e:
            msg = str(e)
            param = "tools" if msg.startswith("tools") else "tool_choice" if "tool_choice" in msg else "messages"
            code = "context_length_exceeded" if "context window" in msg else "invalid_value"
            raise APIError(400, msg, param=param, code=code) from None
        check_length(len(prompt.ids))
        constraint = structured.chat_constraint(pipe, r, prompt, params, tool_choice)
        k = (r.top_logprobs or 0) if r.logprobs else None
        n = choices.check_n(r.n, settings.max_n)
        fresh = [constraint]                    # choice 0 takes the one made above, each other choice its own

        def constraint_of():
            return fresh.pop() if fresh else structured.chat_constraint(pipe, r, prompt, params, tool_choice)
        runs = [(e, q, AnswerText(tok, prompt, params.stop))
                for e, q in submit_n(n, prompt.ids, params, constraint_of, k, adapter)]
        ereqs = [e for e, _, _ in runs]
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        sources = {"sources": kbc.sources()} if kbc else {}

        def chunk(delta, finish=None, lps=None, index=0) -> dict:
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": r.model,
                 "choices": [{"index": index, "delta": delta, "logprobs": {"content": lps} if lps else None,
                              "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return c

        if r.stream:
            async def chunks():
                for i in range(n):
                    yield sse(chunk({"role": "assistant", "content": ""}, index=i))
                streams = [run(request, e, q, a, watch_disconnect=False) for e, q, a in runs]
                async for i, item in choices.merge(streams):
                    if item[0] == "text":
                        yield sse(chunk({"content": item[1]}, lps=item[2] if k is not None else None, index=i))
                    elif item[0] == "tool":
                        yield sse(chunk({"tool_calls": [_tool_delta(item[1])]}, index=i))
                    else:
                        yield sse({**chunk({}, item[1], lps=item[2] if k is not None else None, index=i),
                                   **sources})
            return event_stream(chunks(), ereqs, {"id": cid, "object": "chat.completion.chunk", "created": created,
                                                  "model": r.model, "choices": []}
                                if include_usage else None)

        results = await choices.gather([collect(request, e, q, a) for e, q, a in runs], ereqs)
        out = []
        for i, ((content, lps, reason), (_, _, ans)) in enumerate(zip(results, runs)):
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if ans.tool_calls:
                msg["tool_calls"] = [c.to_openai() for c in ans.tool_calls]
                msg["content"] = content or None
            out.append({"index": i, "message": msg, "logprobs": {"content": lps} if k is not None else None,
                        "finish_reason": reason})
        return {"id": cid, "object": "chat.completion", "created": created, "model": r.model, "choices": out,
                "usage": choices.usage([e.stats for e in ereqs]), **sources}

    async def infill_completion(request: Request, r, text: str, params: SamplingParams, adapter):
        """A prompt with several masks for a blank-filling GLM: every mask filled left to right, one generation
        each (pipeline.InfillPlan) -> the completed text as the choice's text and each mask's span in "spans"
        (the spans alone would lose their places); a stream gets it as one chunk once every mask is filled."""
        if r.logprobs is not None:
            raise APIError(400, "logprobs are not available for a prompt with several masks (send one mask)",
                           param="logprobs", code="invalid_value")
        plan = InfillPlan(tok, pipe.config, text)
        reason, prompt_tokens, new_tokens = "stop", 0, 0
        while (step := plan.next()) is not None:
            ids, state = step
            check_length(len(ids), "prompt")
            ereq, q = submit(ids, params, None, None, adapter, state=state, stop_ids=plan.stops)
            span, _, reason = await collect(request, ereq, q, AnswerText(tok, Prompt(ids=ids), params.stop, raw=True))
            plan.fill(ereq.ids[len(ids):], span)
            prompt_tokens += ereq.stats.prompt_tokens
            new_tokens += ereq.stats.new_tokens
        body = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
                "model": r.model, "choices": [{"index": 0, "text": plan.text, "spans": plan.spans, "logprobs": None,
                                               "finish_reason": reason}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens,
                          "total_tokens": prompt_tokens + new_tokens}}
        if not r.stream:
            return body

        async def one_chunk():
            yield sse(body)
            yield "data: [DONE]\n\n"
        return StreamingResponse(one_chunk(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        auth(request)
        r = schemas.parse(schemas.CompletionRequest, await request.body())
        adapter = check_model(r.model)
        params = sampling(r, r.max_tokens if r.max_tokens is not None else 16)
        p = r.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise APIError(400, "one prompt per request (a list of several prompts is not supported)",
                               param="prompt", code="invalid_value")
            p = p[0]
        if isinstance(p, str) and pipe.config.prefix_lm and len(MASK_TEXT.findall(p)) > 1:
            return await infill_completion(request, r, p, params, adapter)
        if isinstance(p, str):
            if not p:
                raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
            ids = tok.encode_for_generation(p)   # GLM: [gMASK]<sop> appended; a prompt with a mask is infilled
            prompt_text = p
        else:
            if not p:
                raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
            V = pipe.config.vocab_size
            if any(i < 0 or i >= V for i in p):
                raise APIError(400, f"token ids must be in [0, {V})", param="prompt", code="invalid_value")
            ids = list(p)
            prompt_text = tok.decode(ids)
        check_length(len(ids), "prompt")
        k = r.logprobs
        n = choices.check_n(r.n, settings.max_n)
        runs = [(e, q, AnswerText(tok, Prompt(ids=ids), params.stop, raw=True))
                for e, q in submit_n(n, ids, params, lambda: structured.completion_constraint(pipe, r, params), k,
                                       adapter)]
        ereqs = [e for e, _, _ in runs]
        cid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        include_usage = bool((r.stream_options or {}).get("include_usage"))

        def lp_block(entries) -> Optional[dict]:
            if k is None:
                return None
            return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
                    "text_offset": []}

        def chunk(text, finish=None, entries=(), index=0) -> dict:
            c = {"id": cid, "object": "text_completion", "created": created, "model": r.model,
                 "choices": [{"index": index, "text": text, "logprobs": lp_block(list(entries)),
                              "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return c

        if r.stream:
            async def chunks():
                if r.echo:
                    for i in range(n):
                        yield sse(chunk(prompt_text, index=i))
                streams = [run(request, e, q, a, watch_disconnect=False) for e, q, a in runs]
                async for i, item in choices.merge(streams):
                    if item[0] == "text":
                        yield sse(chunk(item[1], entries=item[2], index=i))
                    elif item[0] == "end":
                        yield sse(chunk("", item[1], entries=item[2], index=i))
            return event_stream(chunks(), ereqs, {"id": cid, "object": "text_completion", "created": created,
                                                  "model": r.model, "choices": []}
                                if include_usage else None)

        results = await choices.gather([collect(request, e, q, a) for e, q, a in runs], ereqs)
        out = [{"index": i, "text": (prompt_text if r.echo else "") + text, "logprobs": lp_block(entries),
                "finish_reason": reason} for i, (text, entries, reason) in enumerate(results)]
        return {"id": cid, "object": "text_completion", "created": created, "model": r.model, "choices": out,
                "usage": choices.usage([e.stats for e in ereqs])}

    @app.post("/")
    async def legacy_chatglm(request: Request):
        """ChatGLM-6B's api.py (what LangChain's ChatGLM LLM class calls)."""
        auth(request)
        r = schemas.parse(schemas.LegacyRequest, await request.body())
        messages = []
        for i, pair in enumerate(r.history):
            if len(pair) != 2:
                raise APIError(400, f"history[{i}] must be a [question, answer] pair", param="history",
                               code="invalid_value")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        messages.append({"role": "user", "content": r.prompt})
        try:
            prompt = fmt.render(messages)
        except ChatFormatError as e:
            raise APIError(400, str(e), param="prompt", code="invalid_value") from None
        check_length(len(prompt.ids), "prompt")
        max_new = None
        if r.max_length is not None:                    # the official max_length counts the prompt too
            max_new = r.max_length - len(prompt.ids)
            if max_new < 1:
                raise APIError(400, f"max_length {r.max_length} leaves no room after the prompt's "
                                    f"{len(prompt.ids)} tokens", param="max_length", code="invalid_value")
        try:
            params = pipe.sampling_params(temperature=r.temperature, top_p=r.top_p, max_tokens=max_new)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), code="invalid_value") from None
        ereq, q = submit(prompt.ids, params)
        ans = AnswerText(tok, prompt, ())
        response, _, _ = await collect(request, ereq, q, ans)
        return {"response": response, "history": [list(p) for p in r.history] + [[r.prompt, response]],
                "status": 200, "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    kb_routes.install(app, kbs, auth)
    core = SimpleNamespace(pipe=pipe, settings=settings, engine=engine, kbs=kbs, started=started, auth=auth,
                           check_model=check_model, check_length=check_length, submit=submit, run=run,
                           collect=collect)
    tokens.install(app, core)               # POST /tokenize, /detokenize (llama.cpp server's shapes)
    ollama.install(app, core)               # ollama's API: /api/chat, /api/generate, /api/tags, ...
    edge = _Edge(app, settings.max_body_bytes, metrics, settings.kb_max_upload_bytes if kbs.kbs else 0)
    edge.fastapi, edge.engine = app, engine
    return edge


def _openai_model(h: dict, created: int, ctx: int) -> dict:
    """A store.held() entry in GET /v1/models' shape (OpenAI's fields, then glmkit's)."""
    m = {"id": h["id"], "object": "model", "created": created, "owned_by": "glmkit", "context_length": ctx}
    if h.get("parent"):
        m["parent"] = h["parent"]
    for k in ("generation", "quantization", "size_bytes"):
        if k in h:
            m[k] = h[k]
    return m


def _tool_delta(ev) -> dict:
    if ev[0] == "start":
        _, idx, cid, name = ev
        return {"index": idx, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}
    _, idx, text = ev
    return {"index": idx, "function": {"arguments": text}}
