"""Counters and histograms, rendered in Prometheus' text format at GET /metrics. Thread-safe."""
from __future__ import annotations

import threading
from collections import defaultdict

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float):
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = defaultdict(int)           # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.decode_tps = Histogram(TPS_BUCKETS)    # per request

    def request(self, endpoint: str, status: int):
        with self.lock:
            self.requests[endpoint, status] += 1

    def finished(self, stats):
        with self.lock:
            self.prompt_tokens += stats.prompt_tokens
            self.completion_tokens += stats.new_tokens
            if stats.t_first:
                self.ttft.observe(stats.ttft)
            if stats.decode_tps:
                self.decode_tps.observe(stats.decode_tps)

    def render(self, engine, parallel: int) -> str:
        """Prometheus text: this object's request counters and the engine's (glmkit.engine) own statistics."""
        queue_depth, active, es = engine.queue_depth, engine.active_count, engine.stats
        with self.lock:
            L = ["# HELP glmkit_requests_total HTTP requests by endpoint and status.",
                 "# TYPE glmkit_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                L.append(f'glmkit_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            L += ["# HELP glmkit_prompt_tokens_total Prompt tokens processed.",
                  "# TYPE glmkit_prompt_tokens_total counter", f"glmkit_prompt_tokens_total {self.prompt_tokens}",
                  "# HELP glmkit_completion_tokens_total Tokens generated.",
                  "# TYPE glmkit_completion_tokens_total counter",
                  f"glmkit_completion_tokens_total {self.completion_tokens}",
                  "# HELP glmkit_queue_depth Requests waiting for a slot.", "# TYPE glmkit_queue_depth gauge",
                  f"glmkit_queue_depth {queue_depth}",
                  "# HELP glmkit_active_sequences Sequences being decoded.", "# TYPE glmkit_active_sequences gauge",
                  f"glmkit_active_sequences {active}",
                  "# HELP glmkit_slots Decode slots (--parallel).", "# TYPE glmkit_slots gauge",
                  f"glmkit_slots {parallel}",
                  "# HELP glmkit_time_to_first_token_seconds Time from request to first token.",
                  "# TYPE glmkit_time_to_first_token_seconds histogram"]
            L += self.ttft.lines("glmkit_time_to_first_token_seconds")
            L += ["# HELP glmkit_request_decode_tokens_per_second Decode speed of each finished request.",
                  "# TYPE glmkit_request_decode_tokens_per_second histogram"]
            L += self.decode_tps.lines("glmkit_request_decode_tokens_per_second")
        tps = es.step_tokens / es.step_seconds if es.step_seconds else 0.0
        L += ["# HELP glmkit_decode_tokens_per_second Aggregate decode throughput over all batched steps.",
              "# TYPE glmkit_decode_tokens_per_second gauge", f"glmkit_decode_tokens_per_second {tps:.3f}"]
        L += _summary("glmkit_decode_step_seconds", "Seconds per decode step (all decoding rows together).",
                      es.step_seconds, es.steps, es.step_max)
        L += _summary("glmkit_prefill_chunk_seconds", "Seconds per prefill chunk (between decode steps).",
                      es.chunk_seconds, es.chunks, es.chunk_max)
        L += ["# HELP glmkit_prefill_chunk_tokens Prompt tokens per prefill chunk (--prefill-chunk).",
              "# TYPE glmkit_prefill_chunk_tokens gauge", f"glmkit_prefill_chunk_tokens {engine.prefill_chunk}",
              "# HELP glmkit_prompt_tokens_cached_total Prompt tokens whose keys/values were reused.",
              "# TYPE glmkit_prompt_tokens_cached_total counter",
              f"glmkit_prompt_tokens_cached_total {es.cached_tokens}",
              "# HELP glmkit_prefix_cache_hit_rate Share of prompt tokens reused from a cache (slot or prefix cache).",
              "# TYPE glmkit_prefix_cache_hit_rate gauge", f"glmkit_prefix_cache_hit_rate {es.hit_rate:.4f}"]
        pc = engine.prefix
        if pc is not None:
            L += ["# HELP glmkit_prefix_cache_bytes Memory held by the prefix cache (--cache-mb is its limit).",
                  "# TYPE glmkit_prefix_cache_bytes gauge", f"glmkit_prefix_cache_bytes {pc.bytes}",
                  "# HELP glmkit_prefix_cache_blocks Blocks in the prefix cache.",
                  "# TYPE glmkit_prefix_cache_blocks gauge", f"glmkit_prefix_cache_blocks {len(pc)}",
                  "# HELP glmkit_prefix_cache_evictions_total Blocks evicted (least recently used first).",
                  "# TYPE glmkit_prefix_cache_evictions_total counter",
                  f"glmkit_prefix_cache_evictions_total {pc.evictions}"]
        return "\n".join(L) + "\n"


def _summary(name: str, help_text: str, total: float, count: int, peak: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} summary", f"{name}_sum {total:.6f}",
            f"{name}_count {count}", f"# TYPE {name}_max gauge", f"{name}_max {peak:.6f}"]
