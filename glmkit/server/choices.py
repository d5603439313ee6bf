"""Parts of the OpenAI surface that are about the request rather than the route: several choices of one request
(`n`: each choice is its own engine Sequence, so they decode together as rows of the same steps, and every one
after the first reuses the first's prompt keys/values from its slot), their seeds, their merged stream, their
usage; `logit_bias` and `max_tokens` checked against the model."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator, Optional

from ..sampling import SamplingParams
from .schemas import APIError

MAX_N = 8                      # choices per request (ServerSettings.max_n)
_GOLDEN = 0x9E3779B97F4A7C15   # an odd 64-bit constant: seeds of neighbouring choices are far apart
_DONE = object()


def check_n(n: Optional[int], limit: int) -> int:
    """The request's `n` -> the number of choices, or APIError(400)."""
    if n is None:
        return 1
    if isinstance(n, bool) or not 1 <= n <= limit:
        raise APIError(400, f"n must be from 1 to {limit} on this server, got {n}", param="n", code="invalid_value")
    return n


def derive_seed(seed: Optional[int], i: int) -> Optional[int]:
    """Choice i's seed: the request's own for choice 0 (so n=1 answers as before), a different one derived from it
    for each other choice (seed + i * a large odd constant, mod 2**63); None stays None (each choice draws from
    its own unseeded generator)."""
    if seed is None or i == 0:
        return seed
    return (int(seed) + i * _GOLDEN) % (1 << 63)


def for_choice(params: SamplingParams, i: int) -> SamplingParams:
    return params if i == 0 else dataclasses.replace(params, seed=derive_seed(params.seed, i))


def check_max_tokens(max_tokens: Optional[int], ctx: int, param: str = "max_tokens"):
    """max_tokens that cannot fit the context even after a one-token prompt -> APIError(400) naming both numbers
    (as a prompt longer than the context is answered). Below that, an answer that reaches the end of the context
    ends there with finish_reason "length", as before."""
    if max_tokens is not None and max_tokens >= ctx:
        raise APIError(400, f"{param} is {max_tokens}, but the context of this server is {ctx} tokens (prompt and "
                            f"answer together; at least one is needed for the prompt): ask for at most {ctx - 1}",
                       param=param, code="context_length_exceeded")


def logit_bias(raw: Optional[dict], vocab: int) -> dict:
    """OpenAI's logit_bias ({"token id": bias from -100 to 100}) -> {id: bias}, or APIError(400) naming the key."""
    out = {}
    for key, bias in (raw or {}).items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            tid = None
        if tid is None or str(tid) != str(key).strip() or not 0 <= tid < vocab:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (integers from 0 to "
                                f"{vocab - 1})", param="logit_bias", code="invalid_value")
        if not -100 <= bias <= 100:
            raise APIError(400, f"logit_bias: the bias of token {tid} must be from -100 to 100, got {bias}",
                           param="logit_bias", code="invalid_value")
        out[tid] = float(bias)
    if len(out) > 1024:
        raise APIError(400, f"logit_bias: at most 1024 tokens, got {len(out)}", param="logit_bias",
                       code="invalid_value")
    return out


async def merge(streams: list) -> AsyncIterator[tuple]:
    """Several async iterators -> (index, item) in the order the items arrive. Closing the merged iterator (a client
    gone, an error) cancels every stream still running."""
    if len(streams) == 1:                       # one choice: the stream itself, no task in between
        async for item in streams[0]:
            yield 0, item
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, it):
        try:
            async for item in it:
                await q.put((i, item, None))
        except Exception as e:                  # noqa: BLE001 - re-raised by the consumer
            await q.put((i, None, e))
            return
        await q.put((i, None, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    left = len(tasks)
    try:
        while left:
            i, item, exc = await q.get()
            if exc is _DONE:
                left -= 1
            elif exc is not None:
                raise exc
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def gather(coros: list, seqs: list) -> list:
    """Run the choices' coroutines together; if one fails, the others' sequences are cancelled."""
    try:
        return await asyncio.gather(*coros)
    except BaseException:
        for s in seqs:
            s.cancel()
        raise


def usage(stats: list) -> dict:
    """OpenAI's usage block of several choices of one prompt: the prompt counted once (its cached tokens as the
    first choice found them in the prefix cache), the completion tokens of all choices together."""
    first = stats[0]
    done = sum(s.new_tokens for s in stats)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": done,
            "total_tokens": first.prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": first.reused_tokens}}
