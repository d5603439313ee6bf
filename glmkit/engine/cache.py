"""The KV cache object: static, preallocated keys/values for `slots` sequences of up to `max_seq` positions.

One tensor pair per layer, k and v [slots, G, max_seq, D] (G key/value groups, D head dim), contiguous, so the
fused decode step (fast_decode.py) can read a row as one fp16 [G, max_seq, D] block. The engine owns it and
passes it to model.forward (model.py never stores it); a row belongs to one sequence at a time, and what a row
held stays valid after its sequence ends (the next sequence in that slot reuses the common prefix).

dtype torch.int8 (KVCache.for_model(..., dtype="int8")): keys and values as int8 with one fp32 scale per
position, group and row (k_scale / v_scale [slots, G, max_seq]; s = max|x| / 127, x ~ q * s): (D + 4) / 2D of
the fp16 bytes, 52% at D = 128, for long contexts; the fused decode step reads it directly, model.forward
through update(), which hands back dequantized fp32 keys/values. tests/test_fast_decode.py measures what it
costs in logits.

Position max_seq - 1 of every row is scratch: no sequence ever writes its keys there (a prompt is shorter than
max_seq and the last answer token is never fed back), so batched decode steps write the rows they do not
decode there (engine/step.py).
"""
from __future__ import annotations

from typing import Optional

import torch


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (int8 [..., D], fp32 scales [...]): s = max|x| / 127, q = round(x / s) (0 where s = 0);
    decode_ops.c's cache write does the same arithmetic."""
    x = x.float()
    s = x.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(s > 0, torch.round(x / s), torch.zeros((), dtype=x.dtype)).clamp_(-127, 127)
    return q.to(torch.int8), s.squeeze(-1)


class KVCache:
    """prefix_len virtual tokens (P-tuning v2) occupy the first positions of every row, before position 0 of
    the sequence: positions here are the sequences' own (0..max_seq-1), stored at prefix_len + position."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device, prefix: Optional[torch.Tensor] = None):
        P = 0 if prefix is None else prefix.shape[3]
        shape = (slots, kv_heads, P + max_seq, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.quantized = dtype == torch.int8
        sshape = shape[:3]
        self.k_scale = [torch.zeros(sshape, dtype=torch.float32, device=device) if self.quantized else None
                        for _ in range(num_layers)]
        self.v_scale = [torch.zeros(sshape, dtype=torch.float32, device=device) if self.quantized else None
                        for _ in range(num_layers)]
        self.slots, self.max_seq, self.dtype, self.prefix_len = slots, max_seq, dtype, P
        if prefix is not None:                          # [layers, 2, G, P, D], the same for every row
            for i in range(num_layers):
                self._store(i, slice(None), slice(0, P), prefix[i, 0], prefix[i, 1])

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
        elif isinstance(dtype, str):
            names = {"int8": torch.int8, "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                     "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
            if dtype not in names:
                raise ValueError(f"KV cache dtype {dtype!r}: choose from {', '.join(names)}")
            dtype = names[dtype]
        return cls(cfg.num_layers, slots, cfg.num_kv_heads, max_seq, cfg.head_dim, dtype, model.device, prefix)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one position over all layers."""
        k = self.k[0]
        return 2 * len(self.k) * k.shape[1] * (k.shape[3] * k.element_size() + (4 if self.quantized else 0))

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
            self._store(layer, row0, slice(p0, p0 + T), k[0], v[0])
        else:
            idx = torch.arange(row0, row0 + B, device=k.device)[:, None]
            # advanced indices (rows, positions) around a slice put [B, T] first: [B, T, G, D]
            self._store(layer, idx, cache_pos + P, k.transpose(1, 2), v.transpose(1, 2))
        if self.quantized:
            ks, vs = self.k_scale[layer][rows, :, :P + kv_len], self.v_scale[layer][rows, :, :P + kv_len]
            return K[rows, :, :P + kv_len] * ks[..., None], V[rows, :, :P + kv_len] * vs[..., None]
        return K[rows, :, :P + kv_len], V[rows, :, :P + kv_len]

    def _store(self, layer: int, rows, positions, k: torch.Tensor, v: torch.Tensor):
        """k, v into K[rows, :, positions] and V[...] (shaped as that indexing gives), quantized for an int8
        cache."""
        K, V = self.k[layer], self.v[layer]
        if not self.quantized:
            K[rows, :, positions] = k.to(K.dtype)
            V[rows, :, positions] = v.to(V.dtype)
            return
        (qk, sk), (qv, sv) = quantize_kv(k), quantize_kv(v)
        K[rows, :, positions], V[rows, :, positions] = qk, qv
        self.k_scale[layer][rows, :, positions], self.v_scale[layer][rows, :, positions] = sk, sv

    # --- the engine's side: whole positions of a row, for the prefix cache ----------------------------------
    def read(self, row: int, start: int, stop: int) -> torch.Tensor:
        """A copy of positions [start, stop) of one row: [layers, 2, G, stop - start, D]."""
        a, b = self.prefix_len + start, self.prefix_len + stop
        if self.quantized:         # int8 [layers, 2, G, n, D + 4]: each position's scale as 4 more bytes
            return torch.stack([torch.stack((self._packed(k, ks, row, a, b), self._packed(v, vs, row, a, b)))
                                for k, v, ks, vs in zip(self.k, self.v, self.k_scale, self.v_scale)])
        return torch.stack([torch.stack((k[row, :, a:b], v[row, :, a:b])) for k, v in zip(self.k, self.v)])

    @staticmethod
    def _packed(q, s, row, a, b):
        return torch.cat((q[row, :, a:b], s[row, :, a:b, None].contiguous().view(torch.int8)), dim=-1)

    def copy(self, src: int, dst: int, start: int, stop: int):
        """Positions [start, stop) of row src into row dst."""
        a, b = self.prefix_len + start, self.prefix_len + stop
        for t in self.k + self.v + (self.k_scale + self.v_scale if self.quantized else []):
            t[dst, :, a:b] = t[src, :, a:b]

    def write(self, row: int, start: int, block: torch.Tensor):
        """The inverse of read(): block [layers, 2, G, n, D] into positions [start, start + n) of `row`."""
        a = self.prefix_len + start
        n = block.shape[3]
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            if self.quantized:
                D = k.shape[3]
                for t, ts, part in ((k, self.k_scale[i], block[i, 0]), (v, self.v_scale[i], block[i, 1])):
                    t[row, :, a:a + n] = part[..., :D]
                    ts[row, :, a:a + n] = part[..., D:].contiguous().view(torch.float32)[..., 0]
                continue
            k[row, :, a:a + n] = block[i, 0]
            v[row, :, a:a + n] = block[i, 1]
