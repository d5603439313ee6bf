"""The KV cache object: static, preallocated keys/values for `slots` sequences of up to `max_seq` positions.

One tensor pair per layer, k and v [slots, G, max_seq, D] (G key/value groups, D head dim), contiguous, so the
fused decode step (fast_decode.py) can read a row as one fp16 [G, max_seq, D] block. The engine owns it and
passes it to model.forward (model.py never stores it); a row belongs to one sequence at a time, and what a row
held stays valid after its sequence ends (the next sequence in that slot reuses the common prefix).

Position max_seq - 1 of every row is scratch: no sequence ever writes its keys there (a prompt is shorter than
max_seq and the last answer token is never fed back), so batched decode steps write the rows they do not
decode there (engine/step.py).
"""
from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """prefix_len virtual tokens (P-tuning v2) occupy the first positions of every row, before position 0 of
    the sequence: positions here are the sequences' own (0..max_seq-1), stored at prefix_len + position."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device, prefix: Optional[torch.Tensor] = None):
        P = 0 if prefix is None else prefix.shape[3]
        shape = (slots, kv_heads, P + max_seq, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_seq, self.dtype, self.prefix_len = slots, max_seq, dtype, P
        if prefix is not None:                          # [layers, 2, G, P, D], the same for every row
            for i, (k, v) in enumerate(zip(self.k, self.v)):
                k[:, :, :P] = prefix[i, 0].to(dtype)
                v[:, :, :P] = prefix[i, 1].to(dtype)

    @classmethod
    def for_model(cls, model, slots: int, max_seq: int, dtype: Optional[torch.dtype] = None,
                  prefix: Optional[torch.Tensor] = None) -> "KVCache":
        """A cache for `model` (max_seq <= its max_seq_len), with P-tuning's prefix keys/values [layers, 2, G,
        P, D] when given. Quantized models (and fp16 / bf16 ones on the CPU kernels, float_kernels.py) compute in fp32 on CPU;
        their cache is fp16 (half the memory: 58 MB
        instead of 117 MB per 2048 positions of ChatGLM3-6B; F16C converts it back fast). Other models keep
        their activation dtype."""
        cfg = model.config
        if max_seq > cfg.max_seq_len:
            raise ValueError(f"cache of {max_seq} positions exceeds the model's {cfg.max_seq_len}")
        if slots < 1 or max_seq < 2:
            raise ValueError(f"a cache needs at least 1 slot and 2 positions, got {slots} x {max_seq}")
        if dtype is None:
            from ..float_kernels import uses_float_kernels
            kernels = cfg.quantization or uses_float_kernels(model)       # 16-bit matrices in the CPU kernels
            dtype = torch.float16 if kernels and model.dtype == torch.float32 else model.dtype
        return cls(cfg.num_layers, slots, cfg.num_kv_heads, max_seq, cfg.head_dim, dtype, model.device, prefix)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one position over all layers."""
        k = self.k[0]
        return 2 * len(self.k) * k.shape[1] * k.shape[3] * k.element_size()

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * self.slots * (self.prefix_len + self.max_seq)

    # --- the model's side (model.py's protocol) ------------------------------------------------------------
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_pos: torch.Tensor, kv_len: int,
               row0: int = 0):
        """k, v [B, G, T, D] at positions cache_pos [B, T] of rows row0..row0+B-1
        -> keys/values [B, G, prefix_len + kv_len, D] of those rows (views of the cache)."""
        B, T = cache_pos.shape
        K, V, P = self.k[layer], self.v[layer], self.prefix_len
        rows = slice(row0, row0 + B)
        if B == 1 and (T == 1 or bool((cache_pos[0, 1:] - cache_pos[0, :-1] == 1).all())):
            p0 = P + int(cache_pos[0, 0])                    # one row, consecutive positions: a slice
            K[row0, :, p0:p0 + T] = k[0].to(K.dtype)
            V[row0, :, p0:p0 + T] = v[0].to(V.dtype)
        else:
            idx = torch.arange(row0, row0 + B, device=k.device)[:, None]
            # advanced indices (rows, positions) around a slice put [B, T] first: [B, T, G, D]
            K[idx, :, cache_pos + P] = k.transpose(1, 2).to(K.dtype)
            V[idx, :, cache_pos + P] = v.transpose(1, 2).to(V.dtype)
        return K[rows, :, :P + kv_len], V[rows, :, :P + kv_len]

    # --- the engine's side: whole positions of a row, for the prefix cache ----------------------------------
    def read(self, row: int, start: int, stop: int) -> torch.Tensor:
        """A copy of positions [start, stop) of one row: [layers, 2, G, stop - start, D]."""
        a, b = self.prefix_len + start, self.prefix_len + stop
        return torch.stack([torch.stack((k[row, :, a:b], v[row, :, a:b])) for k, v in zip(self.k, self.v)])

    def copy(self, src: int, dst: int, start: int, stop: int):
        """Positions [start, stop) of row src into row dst."""
        a, b = self.prefix_len + start, self.prefix_len + stop
        for k, v in zip(self.k, self.v):
            k[dst, :, a:b] = k[src, :, a:b]
            v[dst, :, a:b] = v[src, :, a:b]

    def write(self, row: int, start: int, block: torch.Tensor):
        """The inverse of read(): block [layers, 2, G, n, D] into positions [start, start + n) of `row`."""
        a = self.prefix_len + start
        n = block.shape[3]
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            k[row, :, a:a + n] = block[i, 0]
            v[row, :, a:a + n] = block[i, 1]
