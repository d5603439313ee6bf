"""Who may call the server, how often, from which web origins, and what its request log says.

  KeyRing      API keys from --api-key (repeatable) and --api-key-file (one key per line; blank lines and
               "#" comments skipped), the file re-read by reload() (glmkit serve calls it on SIGHUP). A
               server given a key file accepts only its keys, even when the file has none (it fails closed).
  RateLimiter  --rate-limit N: at most N requests per key (per client address on a server without keys) in
               any 60 seconds; the next one gets HTTP 429 with Retry-After (seconds until a slot frees).
  Access       both, as the routes' auth(request): 401 for a missing or unknown key, then 429.
  RequestLog   ASGI middleware: one line per request on the "glmkit.access" logger (method, path without the
               query, status, milliseconds, client address, the key's fingerprint, request bytes); the request
               body (message text) only with log_content (--log-content). Keys themselves are never logged.
  wrap()       RequestLog + CORS (--cors-origin, starlette's CORSMiddleware) around the app.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import math
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from .schemas import APIError

log = logging.getLogger("glmkit.access")
WINDOW = 60.0                 # seconds: --rate-limit counts requests per minute
CONTENT_LOG_CHARS = 4000      # --log-content: the first characters of a request body


class KeyFileError(ValueError):
    pass


def fingerprint(key: str) -> str:
    """What the log says instead of a key: 'key:' + the first 8 hex digits of its SHA-256."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def read_key_file(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"--api-key-file {path}: cannot read it: {e}") from None
    keys = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() for c in line):
            raise KeyFileError(f"--api-key-file {path}:{lineno}: a key cannot hold whitespace (one key per line)")
        keys.append(line)
    return keys


class KeyRing:
    def __init__(self, keys: Iterable[str] = (), key_file: Optional[str] = None):
        self.static = tuple(k for k in keys if k)
        self.key_file = Path(key_file).expanduser() if key_file else None
        self._from_file: tuple = ()
        self._lock = threading.Lock()
        self._table: dict = {}
        self._table_of: Optional[tuple] = None
        if self.key_file is not None:
            self._from_file = tuple(read_key_file(self.key_file))      # at startup a bad file is an error

    @property
    def enabled(self) -> bool:
        return bool(self.static) or self.key_file is not None

    def keys(self) -> tuple:
        return self.static + self._from_file

    def reload(self) -> int:
        """Re-read the key file (SIGHUP) -> how many keys it holds; a file that cannot be read keeps the old
        keys (and says so in the log)."""
        if self.key_file is None:
            return 0
        try:
            keys = tuple(read_key_file(self.key_file))
        except KeyFileError as e:
            log.error("%s; keeping the %d keys read before", e, len(self._from_file))
            return len(self._from_file)
        with self._lock:
            self._from_file = keys
        log.info("reloaded %d API keys from %s", len(keys), self.key_file)
        return len(keys)

    def match(self, given: str) -> Optional[str]:
        """The key equal to `given`, or None: looked up by its SHA-256 digest (so the time taken says nothing
        about how much of a key was right, however many keys there are), then compared in constant time."""
        keys = self.keys()
        if keys != self._table_of:
            self._table = {hashlib.sha256(k.encode()).digest(): k for k in keys}
            self._table_of = keys
        k = self._table.get(hashlib.sha256(given.encode()).digest())
        return k if k is not None and hmac.compare_digest(given.encode(), k.encode()) else None


class RateLimiter:
    """A sliding window of the last 60 seconds per caller."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        if per_minute < 0:
            raise ValueError("--rate-limit must be 0 (off) or more requests per minute")
        self.per_minute, self.clock = per_minute, clock
        self._seen: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def hit(self, who: str) -> Optional[int]:
        """Count a request of `who` -> None if allowed, else the seconds to wait (Retry-After)."""
        if not self.per_minute:
            return None
        now = self.clock()
        with self._lock:
            q = self._seen.setdefault(who, collections.deque())
            while q and q[0] <= now - WINDOW:
                q.popleft()
            if len(q) >= self.per_minute:
                return max(1, math.ceil(q[0] + WINDOW - now))
            q.append(now)
            if len(self._seen) > 10_000:                    # forget callers with nothing in the window
                for k in [k for k, v in self._seen.items() if not v or v[-1] <= now - WINDOW]:
                    del self._seen[k]
        return None


class Access:
    def __init__(self, keys: Optional[KeyRing] = None, rate_limit: int = 0):
        self.keys = keys or KeyRing()
        self.limiter = RateLimiter(rate_limit)

    @classmethod
    def of(cls, api_key) -> "Access":
        """ServerSettings.api_key (None, one key or several) -> Access without a rate limit."""
        keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
        return cls(KeyRing(keys))

    def check(self, request) -> None:
        """The routes' auth: 401 (missing or unknown key), 429 (over --rate-limit); records who called for
        the request log."""
        who = None
        if self.keys.enabled:
            h = request.headers.get("authorization", "")
            given = h[7:].strip() if h[:7].lower() == "bearer " else ""
            if not given:
                raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key")
            key = self.keys.match(given)
            if key is None:
                raise APIError(401, "incorrect API key", code="invalid_api_key")
            who = fingerprint(key)
            request.scope.setdefault("state", {})["glmkit_caller"] = who
        wait = self.limiter.hit(who or "addr:" + (request.client.host if request.client else "?"))
        if wait is not None:
            raise APIError(429, f"rate limit of {self.limiter.per_minute} requests per minute reached; retry in "
                                f"{wait} s", code="rate_limit_exceeded", headers={"Retry-After": str(wait)})


class RequestLog:
    """One log line per HTTP request; message text only when log_content is set."""

    def __init__(self, app, log_content: bool = False):
        self.app, self.log_content = app, log_content

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        status, size, body = {"code": 0}, {"n": 0}, []

        async def recv():
            msg = await receive()
            if msg["type"] == "http.request":
                chunk = msg.get("body", b"")
                size["n"] += len(chunk)
                if self.log_content and sum(map(len, body)) < CONTENT_LOG_CHARS * 4:
                    body.append(chunk)
            return msg

        async def snd(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, recv, snd)
        finally:
            self._line(scope, status["code"], time.monotonic() - t0, size["n"], b"".join(body))

    def _line(self, scope, status: int, seconds: float, nbytes: int, body: bytes):
        client = scope.get("client") or ("-", 0)
        caller = (scope.get("state") or {}).get("glmkit_caller", "-")
        line = (f'{client[0]} {caller} "{scope.get("method", "-")} {scope.get("path", "")}" {status} '
                f'{seconds * 1000:.0f}ms in={nbytes}B')
        if self.log_content and body:
            text = body.decode("utf-8", errors="replace")
            line += " body=" + text[:CONTENT_LOG_CHARS] + ("..." if len(text) > CONTENT_LOG_CHARS else "")
        log.info(line)


def wrap(app, cors_origins: Iterable[str] = (), log_content: bool = False):
    """The request log and CORS around the app (attributes of `app`, such as .fastapi and .engine, kept)."""
    outer = RequestLog(app, log_content=log_content)
    origins = list(cors_origins or [])
    if origins:
        from starlette.middleware.cors import CORSMiddleware
        outer = CORSMiddleware(outer, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                               expose_headers=["Retry-After"], allow_credentials="*" not in origins)
    for name in ("fastapi", "engine"):
        if hasattr(app, name):
            setattr(outer, name, getattr(app, name))
    return outer
