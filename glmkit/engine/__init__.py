"""The one decode engine over token ids (engine.py), its KV cache object (cache.py), prefix cache
(prefix_cache.py), sequences (sequence.py) and step function (step.py, fast_decode.py)."""
from .cache import KVCache
from .engine import DEFAULT_CACHE_MB, Engine, EngineStats, QueueFull, TokenStream, default_prefill_chunk
from .prefix_cache import PrefixCache
from .sequence import ContextOverflow, GenerationStats, SamplerState, Sequence

__all__ = ["KVCache", "Engine", "EngineStats", "QueueFull", "TokenStream", "default_prefill_chunk",
           "DEFAULT_CACHE_MB", "PrefixCache", "ContextOverflow", "GenerationStats", "SamplerState", "Sequence"]
