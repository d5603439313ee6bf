"""glmkit serve: an OpenAI-compatible HTTP server (with ChatGLM's legacy route and a web chat page)."""
from __future__ import annotations

import os
import signal
import sys

from .common import add_model_args, load_pipeline

EXAMPLES = """examples:
  glmkit serve --model ~/models/chatglm3-6b                      # http://127.0.0.1:8000 (web chat at /)
  glmkit serve --model ~/models/glm-4-9b-chat -q int4 --parallel 8 --api-key secret --host 0.0.0.0
  glmkit serve --model ~/models/chatglm3-6b --adapter ads=runs/ads/adapter --adapter law=runs/law/adapter
      # the base as "chatglm3-6b", each LoRA as its NAME (requests for different ones decode together)
  glmkit serve --model ~/models/chatglm3-6b --kb my-kb --kb team-docs   # knowledge bases (`glmkit kb add`)
  glmkit serve --model chatglm3-6b-int4 --api-key-file keys.txt --rate-limit 60 --host 0.0.0.0 \
      --ssl-certfile cert.pem --ssl-keyfile key.pem --cors-origin https://app.example.com
      # a model of the store (glmkit models), keys re-read on `kill -HUP`, 60 requests/min per key, HTTPS

then, with the openai client:
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
  client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "你好"}])
  client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "如何配置输入法？"}],
                                 extra_body={"knowledge_base": "my-kb", "top_k": 3})   # .sources: the chunks

routes: GET / (web chat), GET /health, GET /metrics (Prometheus), GET /v1/models[/ID], POST /v1/chat/completions,
        POST /v1/completions, POST / (ChatGLM api.py: {prompt, history, max_length, top_p, temperature}),
        POST /tokenize, POST /detokenize (llama.cpp's shapes)
  ollama's API (ollama.Client(host="http://127.0.0.1:8000"), LangChain's ChatOllama): POST /api/chat,
        POST /api/generate, GET /api/tags, POST /api/show, GET /api/ps, GET /api/version, POST /api/embed
  with --kb: GET /v1/knowledge_bases, GET /v1/knowledge_bases/NAME/files, POST /v1/knowledge_bases/NAME/files
        (multipart upload, stored in KB/files/), DELETE /v1/knowledge_bases/NAME/files/FILE,
        POST /v1/knowledge_bases/NAME/search {query, top_k, score_threshold}, POST /v1/embeddings (a KB with
        an embedding model); chat with "knowledge_base": NAME [, "top_k", "score_threshold"] answers from it"""


def add_arguments(p):
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    a = p.add_argument_group("access")
    a.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY'; repeatable, any of them is accepted (default: "
                        "$GLMKIT_API_KEY; no key and no key file = open)")
    a.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="accept the keys in FILE (one per line, '#' comments), re-read on SIGHUP "
                        "(kill -HUP PID) without a restart; a key file without keys refuses every request")
    a.add_argument("--rate-limit", type=int, default=0, metavar="N",
                   help="at most N requests per minute per key (per client address without keys); more get "
                        "HTTP 429 with Retry-After (default 0: no limit)")
    a.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API from a browser; "
                        "repeatable (default: none, same-origin only)")
    a.add_argument("--ssl-certfile", default=None, metavar="PEM", help="serve HTTPS with this certificate (uvicorn's)")
    a.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="the certificate's private key")
    a.add_argument("--log-content", action="store_true",
                   help="put request bodies (message text) in the request log; by default a log line holds the "
                        "method, path, status, time, client and key fingerprint only")
    g.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="sequences decoded together in one batch (default 4)")
    g.add_argument("--max-queue", type=int, default=64, metavar="M",
                   help="requests that may wait for a slot; more get HTTP 429 (default 64)")
    g.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="longest a request may take; then it ends with finish_reason 'length' (default 600)")
    g.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the model folder's name)")
    g.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prompt tokens read per step between decode steps, so running streams wait at most one "
                        "chunk for their next token (default 32 on CPU, 512 on a GPU; see README)")
    g.add_argument("--trim-history", action="store_true",
                   help="drop the oldest turns of a chat that does not fit the context, as `glmkit chat` does "
                        "(default: answer HTTP 400 context_length_exceeded, as OpenAI)")
    g.add_argument("--max-body", type=int, default=4 << 20, metavar="BYTES",
                   help="largest request body accepted (default 4 MiB; larger: HTTP 413)")
    g.add_argument("--kb", action="append", default=[], metavar="DIR",
                   help="serve this knowledge base (a `glmkit kb` directory; a new one is created empty), named by "
                        "its directory's name; repeatable. Chat requests with \"knowledge_base\": NAME answer from "
                        "it with the sources; the web chat can upload to it")
    g.add_argument("--kb-max-upload-mb", type=float, default=50.0, metavar="MB",
                   help="largest upload into a knowledge base (default 50; larger: HTTP 413)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="info (default) logs a line per request (see --log-content)")


def run(args) -> int:
    from pathlib import Path

    import uvicorn

    from ..server.app import ServerSettings, create_app

    for name in ("parallel", "max_queue", "port"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise ValueError("--prefill-chunk must be positive")
    if args.kb_max_upload_mb <= 0:
        raise ValueError("--kb-max-upload-mb must be positive")
    if args.cache_mb is not None and args.cache_mb < 0:
        raise ValueError("--cache-mb must be 0 (off) or more")
    access = _access(args)
    from .common import split_adapters
    _, named = split_adapters(args.adapter, named_ok=True)
    from ..store import is_name
    given = args.model
    pipe = load_pipeline(args, named_adapters=True)
    model_id = args.model_name or (given if given and is_name(given)
                                   else Path(args.model).expanduser().resolve().name)
    for name, folder in named.items():              # LoRAs beside the base, each answering model NAME
        if name == model_id:
            raise ValueError(f"--adapter {name}=...: that is the base model's own name")
        pipe.add_adapter(name, folder)
    name = model_id
    settings = ServerSettings(model_id=name, access=access, parallel=args.parallel,
                              max_queue=args.max_queue, request_timeout=args.timeout, max_body_bytes=args.max_body,
                              cache_mb=args.cache_mb, prefill_chunk=args.prefill_chunk,
                              trim_history=args.trim_history, adapters=tuple(named), knowledge_bases=tuple(args.kb),
                              kb_max_upload_bytes=int(args.kb_max_upload_mb * 2**20))
    app = create_app(pipe, settings)
    from ..server import access as access_mod
    asgi = access_mod.wrap(app, args.cors_origin, log_content=args.log_content)
    _request_log(args.log_level)
    if access.keys.key_file is not None and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: access.keys.reload())
    if named:
        print(f"glmkit serve: adapters {', '.join(named)} beside the base", file=sys.stderr)
    for kb in app.fastapi.state.knowledge_bases.kbs.values():
        print(f"glmkit serve: knowledge base {kb.name!r} ({kb.path}): {kb.mode_note}", file=sys.stderr)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"glmkit serve: {name} ({pipe.config.family}, context {pipe.ctx}, {args.parallel} slots) on "
          f"{scheme}://{args.host}:{args.port}  (web chat at /, API at /v1)", file=sys.stderr, flush=True)
    uvicorn.run(asgi, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                access_log=False, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return 0


def _access(args):
    """--api-key / $GLMKIT_API_KEY, --api-key-file, --rate-limit, TLS files -> access.Access (checked first:
    a bad key file or a missing certificate stops the command before the model is read)."""
    from ..server.access import Access, KeyRing

    keys = list(args.api_key or [])
    if not keys and os.environ.get("GLMKIT_API_KEY"):
        keys = [os.environ["GLMKIT_API_KEY"]]
    if args.rate_limit < 0:
        raise ValueError("--rate-limit must be 0 (off) or more requests per minute")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ValueError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    for f in (args.ssl_certfile, args.ssl_keyfile):
        if f and not os.path.isfile(f):
            raise ValueError(f"{f}: no such file (--ssl-certfile/--ssl-keyfile)")
    return Access(KeyRing(keys, args.api_key_file), rate_limit=args.rate_limit)


def _request_log(level: str):
    import logging

    lg = logging.getLogger("glmkit.access")
    if not lg.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s glmkit.access %(levelname)s: %(message)s"))
        lg.addHandler(h)
    lg.setLevel(level.upper())
    lg.propagate = False
