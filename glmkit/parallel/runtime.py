"""Rank 0 leads, the other ranks follow: every call the engine (or a Pipeline) makes into the model on rank 0
is first broadcast to the followers, which make the same call on their shards, so the collectives inside
the layers (layers.py) meet. What travels is the step's inputs: token ids, positions (cache_pos), kv_len, the
cache rows (row0) and which KV cache (each rank holds its own, for its heads: a cache on rank 0 is mirrored
by one of the same slots, positions and dtype on every follower), ChatGLM-6B's SeqState, and for a long
bidirectional context read a layer range at a time its hidden states and attention inputs.

    lead(model)       rank 0: wrap the model's forward / embed / blocks / head (a subclass swapped in, so the
                      engine and Pipeline use it as they are); stop(model) ends the followers
    follow(model)     ranks > 0: run the broadcast calls until rank 0 stops (returns then)

Engines on a tensor-parallel model run with the prefix cache off (cache_mb 0): its copies between cache rows
happen outside the model and are not mirrored.
"""
from __future__ import annotations

import atexit
import logging
import threading
from typing import Any

import torch

from ..engine.cache import KVCache
from ..model import GLM
from . import dist

METHODS = ("forward", "embed", "blocks", "head")
log = logging.getLogger("glmkit.parallel")


class _CacheRef:
    """What a follower needs to find or make its own mirror of a KV cache on rank 0."""

    def __init__(self, cache: KVCache):
        if not isinstance(cache, KVCache) or cache.prefix_len:
            raise TypeError("tensor-parallel models run with the engine's KV cache only (no P-tuning prefix)")
        self.key = (id(cache), cache.slots, cache.max_seq, str(cache.dtype))
        self.slots, self.max_seq, self.dtype = cache.slots, cache.max_seq, cache.dtype


def _map(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):          # NamedTuple (SeqState)
        return type(x)(*(_map(v, fn) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_map(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    if isinstance(x, KVCache):
        return _CacheRef(x)
    return x


class _Leader(GLM):
    """GLM on rank 0 of a tensor-parallel group: each outermost call is broadcast before it runs locally."""

    def _lead(self, name: str, args, kwargs):
        with self._tp_lock:
            if self._tp_depth == 0:
                dist.broadcast_object((name, _map(args, lambda t: t.cpu()), _map(kwargs, lambda t: t.cpu())))
            self._tp_depth += 1
            try:
                return getattr(GLM, name)(self, *args, **kwargs)
            finally:
                self._tp_depth -= 1

    def forward(self, *args, **kwargs):
        return self._lead("forward", args, kwargs)

    def embed(self, *args, **kwargs):
        return self._lead("embed", args, kwargs)

    def blocks(self, *args, **kwargs):
        return self._lead("blocks", args, kwargs)

    def head(self, *args, **kwargs):
        return self._lead("head", args, kwargs)


def lead(model: GLM) -> GLM:
    """Make rank 0's model broadcast its calls (in place); the followers are stopped at exit at the latest."""
    if type(model) is not GLM:
        raise TypeError(f"cannot lead a {type(model).__name__}")
    model._tp_lock, model._tp_depth, model._tp_stopped = threading.RLock(), 0, False
    model.__class__ = _Leader
    atexit.register(stop, model)
    return model


def stop(model: GLM):
    """Tell the followers to return from follow() (once)."""
    if isinstance(model, _Leader) and not model._tp_stopped:
        with model._tp_lock:
            model._tp_stopped = True
            dist.broadcast_object(None)


def follow(model: GLM) -> int:
    """Ranks > 0: make every call rank 0 broadcasts, on this rank's shards and caches, until rank 0 stops.
    Returns the number of calls made."""
    caches: dict[Any, KVCache] = {}
    dev = model.device

    def local(x):
        if isinstance(x, _CacheRef):
            if x.key not in caches:
                caches[x.key] = KVCache.for_model(model, x.slots, x.max_seq, dtype=x.dtype)
            return caches[x.key]
        return x

    n = 0
    with torch.inference_mode():
        while True:
            msg = dist.broadcast_object(None)
            if msg is None:
                return n
            name, args, kwargs = msg
            args = tuple(local(a) for a in _map(args, lambda t: t.to(dev)))
            kwargs = {k: local(v) for k, v in _map(kwargs, lambda t: t.to(dev)).items()}
            if name not in METHODS:
                raise RuntimeError(f"rank 0 asked for an unknown call {name!r}")
            try:
                getattr(GLM, name)(model, *args, **kwargs)
            except Exception:                   # noqa: BLE001 - rank 0 fails the same call the same way
                log.exception("tensor-parallel follower: %s failed (as it must have on rank 0)", name)
            n += 1
