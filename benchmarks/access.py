"""Cost of glmkit serve's access check per request (glmkit/server/access.py: key lookup + rate-limit window),
for 1 and 100 keys. `python benchmarks/access.py`; microseconds per request, the median of 5 runs."""
from __future__ import annotations

import statistics
import timeit

from glmkit.server.access import Access, KeyRing


class _Request:
    def __init__(self, key: str):
        self.headers, self.scope, self.client = {"authorization": "Bearer " + key}, {}, None


def per_request_us(n_keys: int, rate_limit: int, n: int = 20000) -> float:
    keys = [f"sk-key-{i:04d}-abcdefghijklmnop" for i in range(n_keys)]
    access = Access(KeyRing(keys), rate_limit=rate_limit)
    req = _Request(keys[n_keys // 2])
    return statistics.median(timeit.repeat(lambda: access.check(req), number=n, repeat=5)) / n * 1e6


if __name__ == "__main__":
    for n_keys in (1, 100):
        for limit in (0, 10**9):
            print(f"keys={n_keys:<4d} rate_limit={'on' if limit else 'off':<4s} "
                  f"{per_request_us(n_keys, limit):.1f} us/request")
