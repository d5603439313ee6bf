"""ollama's API on the same server, model and engine (for the clients that speak it: the `ollama` Python client,
LangChain's ChatOllama, Open WebUI, Continue, ...):

    POST /api/chat       {model, messages, tools, format, options, stream (default true), keep_alive, logprobs}
    POST /api/generate   {model, prompt, system, raw, format, options, stream, ...}
    GET  /api/tags       the served model (and its LoRA adapters) as "NAME:latest"
    POST /api/show       details, model_info, capabilities, parameters of one of them
    GET  /api/ps         what is loaded (everything served: one model stays in memory)
    GET  /api/version    {"version"}: the ollama API level implemented here (OLLAMA_API_VERSION)
    POST /api/embed      {model, input} with a knowledge base's embedding model (serve --kb, see kb_routes);
    POST /api/embeddings the legacy {model, prompt} form of it

Streamed answers are NDJSON (one JSON object a line, the last with "done": true and the counts and durations in
nanoseconds); `stream: false` gives the one object. `options` takes temperature, top_p, top_k, num_predict, seed,
stop, repeat_penalty, presence_penalty and frequency_penalty; the options that size or place a model (num_ctx,
num_gpu, num_thread, ...) are accepted and ignored (the server's --ctx, --threads decide); sampling options that
glmkit does not have (mirostat, tfs_z, typical_p, min_p) are refused unless they hold their neutral value.
`format`: "json" or a JSON schema, through format_constraint(), the one call into structured decoding.
Errors are ollama's: {"error": "..."} with the HTTP status (400 bad input, 401 key, 404 model, 429 busy).
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from ..chat_format import ChatFormatError, Prompt
from ..pipeline import AnswerText
from . import choices, schemas
from .schemas import APIError

log = logging.getLogger("glmkit.server")

OLLAMA_API_VERSION = "0.5.0"       # the first ollama release whose `format` takes a JSON schema
TAG = "latest"

# options: ollama's name -> glmkit's sampling parameter
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
            "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty"}
# options that choose how a model is loaded or run, not what it answers: the server's own flags decide them
IGNORED = {"numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
           "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep", "repeat_last_n", "penalize_newline",
           "mirostat_tau", "mirostat_eta"}
# sampling methods glmkit does not have: accepted at their neutral value only
NEUTRAL = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0, "min_p": 0.0}


# ------------------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------------------

class _Req(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class OMessage(_Req):
    role: str
    content: Optional[str] = ""
    images: Optional[list[Any]] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_name: Optional[str] = None
    thinking: Optional[str] = None


class _Generation(_Req):
    model: str
    stream: Optional[bool] = None
    format: Optional[Union[str, dict[str, Any]]] = None
    options: Optional[dict[str, Any]] = None
    keep_alive: Optional[Union[float, int, str]] = None
    think: Optional[Union[bool, str]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


class OChatRequest(_Generation):
    messages: list[OMessage] = []
    tools: Optional[list[dict[str, Any]]] = None


class OGenerateRequest(_Generation):
    prompt: Optional[str] = None
    suffix: Optional[str] = None
    system: Optional[str] = None
    template: Optional[str] = None
    context: Optional[list[int]] = None
    raw: Optional[bool] = None
    images: Optional[list[Any]] = None


class OModelRequest(_Req):
    model: Optional[str] = None
    name: Optional[str] = None          # older clients' spelling


class OEmbedRequest(_Req):
    model: str
    input: Union[str, list[str]]
    truncate: Optional[bool] = None
    options: Optional[dict[str, Any]] = None
    keep_alive: Optional[Union[float, int, str]] = None
    dimensions: Optional[int] = None


class OEmbeddingsRequest(_Req):
    model: str
    prompt: str
    options: Optional[dict[str, Any]] = None
    keep_alive: Optional[Union[float, int, str]] = None


# ------------------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------------------

def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def _errors(fn):
    """A route answering every error in ollama's shape: {"error": message}."""
    @functools.wraps(fn)
    async def wrapper(*a, **kw):
        try:
            return await fn(*a, **kw)
        except APIError as e:
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        except Exception as e:                  # noqa: BLE001 - a 500 in the same shape
            log.exception("unhandled error")
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
    return wrapper


def _bad(msg: str) -> APIError:
    return APIError(400, msg, code="invalid_value")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _name(model: str) -> str:
    """"chatglm3-6b:latest" -> "chatglm3-6b" (the tag every served model has)."""
    return model[: -len(TAG) - 1] if model.endswith(":" + TAG) else model


def resolve(core, model: str) -> Optional[str]:
    """The request's model -> the adapter that answers it (None: the base), or APIError(404) in ollama's words."""
    try:
        return core.check_model(_name(model))
    except APIError:
        served = ", ".join(f"{m}:{TAG}" for m in [core.settings.model_id, *core.settings.adapters])
        raise APIError(404, f"model '{model}' not found; this server serves {served}") from None


def response_format_of(fmt) -> Optional[dict]:
    """ollama's `format` -> the OpenAI response_format it means (None: free text)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt, "strict": False}}     # ollama takes any schema
    raise _bad(f'format must be "json" or a JSON schema (an object), got {fmt!r}')


def format_constraint(pipe, fmt, prompt: Prompt, params):
    """The one call into structured decoding: ollama's `format` -> the engine's constraint (or None)."""
    try:
        return pipe.constraint_for(response_format_of(fmt), prompt, params)
    except ValueError as e:
        raise _bad(f"format: {e}") from None


def _number(name: str, v, lo=None, hi=None, integer=False, lo_open=False):
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (lo is not None and (v <= lo if lo_open else v < lo)) or \
            (hi is not None and v > hi):
        kind = "an integer" if integer else "a number"
        rng = f" {'above' if lo_open else 'from'} {lo}" if lo is not None else ""
        rng += f" up to {hi}" if hi is not None else ""
        raise _bad(f"options.{name} must be {kind}{rng}, got {v!r}")
    return v


_LIMITS = {"temperature": dict(lo=0), "top_p": dict(lo=0, hi=1, lo_open=True), "top_k": dict(lo=0, integer=True),
           "seed": dict(integer=True), "repeat_penalty": dict(lo=0, lo_open=True),
           "presence_penalty": dict(lo=-2, hi=2), "frequency_penalty": dict(lo=-2, hi=2)}


def sampling_of(pipe, options: Optional[dict]):
    """ollama's `options` -> SamplingParams (the model's defaults for what is not given), or APIError(400)."""
    kw: dict = {}
    for k, v in (options or {}).items():
        if v is None or k in IGNORED:
            continue
        if k in SAMPLING:
            kw[SAMPLING[k]] = _number(k, v, **_LIMITS[k])
        elif k == "num_predict":
            n = _number(k, v, integer=True)
            if n == 0 or n < -2:
                raise _bad(f"options.num_predict must be positive, or -1 (until the model stops) or -2 (until the "
                           f"context is full), got {n}")
            if n > 0:
                choices.check_max_tokens(n, pipe.ctx, "options.num_predict")
                kw["max_tokens"] = n
        elif k == "stop":
            stop = [v] if isinstance(v, str) else v
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
                raise _bad("options.stop must be a list of at most 16 strings")
            kw["stop"] = tuple(stop)
        elif k in NEUTRAL:
            if v != NEUTRAL[k]:
                raise _bad(f"options.{k} is not supported by glmkit (only its neutral value {NEUTRAL[k]}); use "
                           "temperature, top_p, top_k and the penalties")
        else:
            raise _bad(f"unknown option {k!r}; glmkit takes {', '.join(sorted([*SAMPLING, 'num_predict', 'stop']))}")
    try:
        return pipe.sampling_params(**kw)
    except (ValueError, TypeError) as e:
        raise _bad(f"options: {e}") from None


def _no_think(think):
    if think not in (None, False):
        raise _bad("this model does not support thinking (think)")


def _no_images(images, where: str):
    if images:
        raise _bad(f"{where}: images are not supported: GLM chat models here read text only")


def messages_of(msgs: list) -> list:
    """ollama's messages -> the chat format's (OpenAI-style) messages."""
    out = []
    for i, m in enumerate(msgs):
        _no_images(m.images, f"messages[{i}]")
        d: dict = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            d["tool_calls"] = m.tool_calls          # {"function": {"name", "arguments": {...}}}: as OpenAI's
        if m.role == "tool" and m.tool_name:
            d["name"] = m.tool_name
        out.append(d)
    return out


def _calls(ans) -> list:
    """The answer's tool calls in ollama's shape: arguments as an object, not JSON text."""
    out = []
    for c in ans.tool_calls:
        try:
            args = json.loads(c.arguments)
        except ValueError:
            args = None
        out.append({"function": {"name": c.name, "arguments": args if isinstance(args, dict) else {}}})
    return out


def _counts(st) -> dict:
    """The closing counts and durations (nanoseconds) of an answer."""
    ns = 1e9
    end = st.t_end or time.perf_counter()
    first = st.t_first or end
    return {"total_duration": int((end - st.t_start) * ns), "load_duration": 0,
            "prompt_eval_count": st.prompt_tokens, "prompt_eval_duration": int((first - st.t_start) * ns),
            "eval_count": st.new_tokens, "eval_duration": int((end - first) * ns)}


def _done_reason(reason: Optional[str]) -> str:
    return "length" if reason == "length" else "stop"


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------

def _weights(path: Optional[Path]) -> list:
    if path is None or not Path(path).is_dir():
        return []
    return sorted(p for p in Path(path).iterdir()
                  if p.is_file() and p.suffix in (".safetensors", ".bin"))          # what glmkit loads


def details(pipe, parent: str = "") -> dict:
    cfg = pipe.config
    files = _weights(pipe.path)
    fmt = "safetensors" if any(p.suffix == ".safetensors" for p in files) else "pytorch" if files else ""
    q = cfg.quantization or {}
    if q.get("bits"):
        level = f"Q{int(q['bits'])}_0"
    else:
        level = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}.get(
            str(next(pipe.model.parameters()).dtype), "")
    n = cfg.num_params()
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return {"parent_model": parent, "format": fmt, "family": cfg.family, "families": [cfg.family],
            "parameter_size": size, "quantization_level": level}


def _folder_info(path: Optional[Path]) -> tuple:
    """(bytes on disk of the weights, modified time ISO, a digest naming this version of the folder)."""
    files = _weights(path)
    size = sum(p.stat().st_size for p in files)
    mtime = max((p.stat().st_mtime for p in files), default=time.time())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    modified = datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    return size, modified, h.hexdigest()


def model_entries(core) -> list:
    pipe, settings = core.pipe, core.settings
    size, modified, digest = _folder_info(pipe.path)
    out = [{"name": f"{settings.model_id}:{TAG}", "model": f"{settings.model_id}:{TAG}", "modified_at": modified,
            "size": size, "digest": digest, "details": details(pipe)}]
    for a in settings.adapters:
        folder = pipe.named_adapters.get(a)
        a_size, a_modified, _ = _folder_info(folder)
        a_digest = hashlib.sha256(f"{digest}:{folder}".encode()).hexdigest()
        out.append({"name": f"{a}:{TAG}", "model": f"{a}:{TAG}", "modified_at": a_modified, "size": size + a_size,
                    "digest": a_digest, "details": details(pipe, parent=f"{settings.model_id}:{TAG}")})
    return out


def show(core, model: str) -> dict:
    pipe = core.pipe
    adapter = resolve(core, model)
    entry = next(e for e in model_entries(core) if e["name"] == f"{adapter or core.settings.model_id}:{TAG}")
    cfg, fam = pipe.config, pipe.config.family
    lic = Path(pipe.path) / "MODEL_LICENSE" if pipe.path else None
    params = "\n".join(f"{k} {v}" for k, v in pipe.defaults.items() if k in ("temperature", "top_p", "top_k",
                                                                              "repetition_penalty"))
    caps = ["completion"] + (["tools"] if pipe.chat_format.supports_tools else [])
    info = {"general.architecture": fam, "general.parameter_count": cfg.num_params(),
            f"{fam}.context_length": pipe.ctx, f"{fam}.embedding_length": cfg.hidden_size,
            f"{fam}.block_count": cfg.num_layers, f"{fam}.attention.head_count": cfg.num_heads,
            f"{fam}.vocab_size": cfg.vocab_size}
    return {"license": lic.read_text(errors="replace") if lic is not None and lic.is_file() else "",
            "modelfile": f"# served by glmkit\nFROM {pipe.path}\n" + (f"ADAPTER {pipe.named_adapters[adapter]}\n"
                                                                      if adapter else ""),
            "parameters": params, "template": "", "details": entry["details"], "model_info": info,
            "capabilities": caps, "modified_at": entry["modified_at"]}


# ------------------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------------------

def _ndjson(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _answer(core, request, r, prompt: Prompt, ids, params, adapter, raw: bool, piece_key: str):
    """Submit one generation and answer it: NDJSON chunks (stream, the default) or one object."""
    tok = core.pipe.tokenizer
    constraint = format_constraint(core.pipe, r.format, prompt, params)
    k = (r.top_logprobs or 0) if r.logprobs or r.top_logprobs else None
    ereq, q = core.submit(ids, params, constraint, k, adapter)
    ans = AnswerText(tok, prompt, params.stop, raw=raw)
    head = {"model": r.model}

    def part(text: str, extra=None) -> dict:
        body = {"role": "assistant", "content": text, **(extra or {})} if piece_key == "message" else text
        return {**head, "created_at": now_iso(), piece_key: body}

    def lp(entries):
        return {"logprobs": entries} if k is not None and entries else {}

    def tool_extra():
        return {"tool_calls": _calls(ans)} if piece_key == "message" and ans.tool_calls else None

    if r.stream is not False:
        async def lines():
            try:
                async for item in core.run(request, ereq, q, ans, watch_disconnect=False):
                    if item[0] == "text" and item[1]:
                        yield _ndjson({**part(item[1]), **lp(item[2]), "done": False})
                    elif item[0] == "end":
                        if tool_extra():
                            yield _ndjson({**part("", tool_extra()), "done": False})
                        yield _ndjson({**part(""), **lp(item[2]), "done": True, "done_reason": _done_reason(item[1]),
                                       **_counts(ereq.stats)})
            except APIError as e:
                yield _ndjson({"error": e.message})
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def whole():
        text, entries, reason = await core.collect(request, ereq, q, ans)
        return {**part(text, tool_extra()), **lp(entries), "done": True, "done_reason": _done_reason(reason),
                **_counts(ereq.stats)}
    return whole()


def _loaded(r, piece_key: str) -> dict:
    """The answer to a request with nothing to generate: ollama loads (or, keep_alive 0, unloads) the model."""
    body = {"role": "assistant", "content": ""} if piece_key == "message" else ""
    return {"model": r.model, "created_at": now_iso(), piece_key: body, "done": True,
            "done_reason": "unload" if r.keep_alive in (0, "0", "0s") else "load"}


# ------------------------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------------------------

def install(app, core) -> None:
    pipe, fmt, tok = core.pipe, core.pipe.chat_format, core.pipe.tokenizer

    @app.post("/api/chat")
    @_errors
    async def chat(request: Request):
        core.auth(request)
        r = schemas.parse(OChatRequest, await request.body())
        adapter = resolve(core, r.model)
        _no_think(r.think)
        if not r.messages:
            return _loaded(r, "message")
        messages = messages_of(r.messages)
        params = sampling_of(pipe, r.options)
        try:
            prompt = fmt.render(messages, tools=r.tools or None)
        except ChatFormatError as e:
            raise _bad(str(e)) from None
        core.check_length(len(prompt.ids))
        out = _answer(core, request, r, prompt, prompt.ids, params, adapter, raw=False, piece_key="message")
        return out if isinstance(out, StreamingResponse) else await out

    @app.post("/api/generate")
    @_errors
    async def generate(request: Request):
        core.auth(request)
        r = schemas.parse(OGenerateRequest, await request.body())
        adapter = resolve(core, r.model)
        _no_think(r.think)
        _no_images(r.images, "images")
        for field, why in (("suffix", "fill-in-the-middle"), ("template", "a custom prompt template"),
                           ("context", "continuing from a returned context (send the history to /api/chat)")):
            if getattr(r, field):
                raise _bad(f"{field} is not supported: glmkit has no {why}")
        if not r.prompt:
            return _loaded(r, "response")
        params = sampling_of(pipe, r.options)
        if r.raw:                          # the prompt as written: the tokenizer's encode(), no chat format
            if r.system:
                raise _bad("system is not used with raw: true (write it into the prompt)")
            ids = tok.encode(r.prompt)
            prompt = Prompt(ids=ids)
        else:
            messages = ([{"role": "system", "content": r.system}] if r.system else []) + \
                       [{"role": "user", "content": r.prompt}]
            try:
                prompt = fmt.render(messages)
            except ChatFormatError as e:
                raise _bad(str(e)) from None
            ids = prompt.ids
        core.check_length(len(ids), "prompt")
        out = _answer(core, request, r, prompt, ids, params, adapter, raw=bool(r.raw), piece_key="response")
        return out if isinstance(out, StreamingResponse) else await out

    @app.get("/api/tags")
    @_errors
    async def tags(request: Request):
        core.auth(request)
        return {"models": model_entries(core)}

    @app.get("/api/ps")
    @_errors
    async def ps(request: Request):
        core.auth(request)
        return {"models": [{**e, "size_vram": 0, "context_length": pipe.ctx} for e in model_entries(core)]}

    @app.post("/api/show")
    @_errors
    async def show_route(request: Request):
        core.auth(request)
        r = schemas.parse(OModelRequest, await request.body())
        name = r.model or r.name
        if not name:
            raise _bad("missing model: send {\"model\": NAME}")
        return show(core, name)

    @app.get("/api/version")
    @_errors
    async def version(request: Request):
        return {"version": OLLAMA_API_VERSION}

    async def embed_texts(model: str, texts: list):
        import numpy as np

        if not any(kb.embedder is not None for kb in core.kbs.kbs.values()):
            raise _bad("no embedding model is configured on this server: /api/embed embeds with a knowledge base's "
                       "model (glmkit serve --kb DIR, DIR made with `glmkit kb add DIR --embedding-model MODEL`); "
                       "the chat model itself does not embed")
        emb = core.kbs.embedder(_name(model))
        t0 = time.perf_counter()
        vectors = np.asarray(await asyncio.to_thread(emb.encode, texts), dtype=np.float32)
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)   # as ollama: unit
        st_tok = getattr(getattr(emb, "model", None), "tokenizer", None)
        n = sum(len(st_tok(t)["input_ids"]) for t in texts) if callable(st_tok) else 0
        return vectors.tolist(), n, int((time.perf_counter() - t0) * 1e9)

    @app.post("/api/embed")
    @_errors
    async def embed(request: Request):
        core.auth(request)
        r = schemas.parse(OEmbedRequest, await request.body())
        texts = [r.input] if isinstance(r.input, str) else list(r.input)
        if not texts or any(not t for t in texts) or len(texts) > 2048:
            raise _bad("input must be a non-empty string or a list of 1 to 2048 non-empty strings")
        if r.dimensions is not None:
            raise _bad("dimensions is not supported: the model's vectors are returned whole")
        vectors, n, dt = await embed_texts(r.model, texts)
        return {"model": r.model, "embeddings": vectors, "total_duration": dt, "load_duration": 0,
                "prompt_eval_count": n}

    @app.post("/api/embeddings")
    @_errors
    async def embeddings(request: Request):
        core.auth(request)
        r = schemas.parse(OEmbeddingsRequest, await request.body())
        if not r.prompt:
            raise _bad("prompt is empty")
        vectors, _, _ = await embed_texts(r.model, [r.prompt])
        return {"embedding": vectors[0]}
