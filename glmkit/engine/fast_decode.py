"""The one-token decode step of a quantized causal GLM on CPU, with no PyTorch op between the matrix multiplies.

model.py's forward is the reference and handles every case; for batch 1 it spends ~60 small PyTorch ops per
layer besides the four quantized GEMMs (norms, rotary, cache write, fp16 -> fp32 of the cached keys and values,
attention, SiLU * up, residual adds). Each op costs a few microseconds of dispatch on one thread: ~30 ms of a
~185 ms ChatGLM3-6B INT4 step on 2 cores. Here a layer is seven C calls on preallocated buffers:

    h = rmsnorm(x += m_prev)      qkv = gemm(h)      y = attend(qkv -> rotary, cache write, softmax(qK)V)
    a = gemm(y)                   h = rmsnorm(x += a)     u = gemm(h)     g = swiglu(u)     m = gemm(g)

(glmkit/kernels/decode_ops.c for the fused ops). It lives outside model.py because it needs the kernels, and
model.py imports only torch and the config. engine/step.py runs the decode steps of ChatGLM2/3 and GLM-4 shapes
whose matrices all run in the kernels through it; why_not() names what keeps a model on the reference path.
GLMKIT_FAST_DECODE=0 turns it off (A/B measurements). tests/test_fast_decode.py holds it to model.forward.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ..float_kernels import FloatLinear
from ..model import GLM
from ..quant import QuantLinear
from .cache import KVCache


def _env_off() -> bool:
    return os.environ.get("GLMKIT_FAST_DECODE", "1").strip().lower() in ("0", "false", "no", "off")


def why_not(model: GLM, cache: Optional[KVCache] = None) -> Optional[str]:
    """None when FastDecoder can run this model over this cache (None: any fp16 cache); else the reason it
    cannot. Packs the quantized layers for the kernels on the way (QuantLinear.prepare, as their first forward
    would)."""
    from .. import kernels
    if _env_off():
        return "disabled by GLMKIT_FAST_DECODE=0"
    if not kernels.available():
        return f"kernels unavailable: {kernels.reason()}"
    cfg = model.config
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return "needs fp32 activations on CPU (a quantized model, or a float one on the kernels)"
    if cfg.rope_2d or cfg.prefix_lm or cfg.glm_residual:
        return "ChatGLM-6B layout (2D rotary, prefix attention, alpha residual)"
    if cfg.norm != "rmsnorm" or cfg.activation != "swiglu" or cfg.qkv_layout == "per_head":
        return "needs RMSNorm, SwiGLU and the [q | k | v] projection"
    for i, layer in enumerate(model.layers):
        for name, mod in (("attn.qkv", layer.attn.qkv), ("attn.out", layer.attn.out), ("mlp.up", layer.mlp.up),
                          ("mlp.down", layer.mlp.down)):
            if type(mod) not in (QuantLinear, FloatLinear) or not mod.prepare():
                return f"layers.{i}.{name} is not a quantized or fp16/bf16 layer on the kernels' path"
    if cache is not None and (cache.dtype != torch.float16 or not all(t.is_contiguous() for t in cache.k + cache.v)
                              or cache.k[0].device.type != "cpu"):
        return f"needs a contiguous fp16 KV cache on CPU (this one is {cache.dtype})"
    return None


class FastDecoder:
    """step(tokens, positions, rows) -> logits [M, V]: token i at positions[i] of cache row rows[i] (earlier
    positions of each row already cached), equal to model.forward of the same step up to float summation order.
    A row may take several consecutive positions in one step (a piece of a prompt beside other rows' decode
    tokens): each token attends to its row's keys up to its own position, written in order.
    Holds raw pointers into the model's weights and the cache's tensors, so rebuild it when the weights are
    replaced (valid() tells)."""

    def __init__(self, model: GLM, cache: KVCache):
        reason = why_not(model, cache)
        if reason:
            raise ValueError(f"fast decode unavailable: {reason}")
        from .. import kernels
        self.ext = kernels._extension()
        self.model, self.cache = model, cache
        cfg = model.config
        self.C, self.H, self.G, self.D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.R, self.F, self.eps = cfg.rope_dim, cfg.ffn_hidden_size, float(cfg.norm_eps)
        self.interleaved = int(bool(cfg.rope_interleaved))
        self.rows, self.max_seq = cache.slots, cache.max_seq
        self._buffers(self.rows)
        self.cos, self.sin = model.rope_table("cpu")
        self.half = self.cos.shape[1]
        self.layers = []
        for layer, k, v in zip(model.layers, cache.k, cache.v):
            self.layers.append((
                layer.attn_norm.weight.detach().contiguous(), self._gemm_args(layer.attn.qkv),
                self._gemm_args(layer.attn.out), layer.ffn_norm.weight.detach().contiguous(),
                self._gemm_args(layer.mlp.up), self._gemm_args(layer.mlp.down), k, v))
        self.norm_w = model.norm.weight.detach().contiguous()

    def _buffers(self, n: int):
        """Activation buffers for up to n tokens per step."""
        def buf(width):
            return torch.zeros(n, width, dtype=torch.float32)
        self.capacity = n
        self.x, self.h, self.y = buf(self.C), buf(self.C), buf(self.H * self.D)
        self.qkv = buf(self.model.config.qkv_size)
        self.a, self.m, self.u, self.g = buf(self.C), buf(self.C), buf(2 * self.F), buf(self.F)

    @staticmethod
    def _gemm_args(mod: QuantLinear):
        from .. import kernels
        p = mod._packed
        _, soff = kernels._layout(mod.bits, mod.out_features, mod.in_features, mod.group)
        bias = 0 if mod.bias is None else mod.bias.data_ptr()
        return (mod.bits, p.data_ptr(), p.data_ptr() + soff, bias, mod.out_features, mod.in_features, mod.group,
                p, mod.bias)                                   # the last two keep the tensors alive

    def valid(self) -> bool:
        """Still pointing at the model's packed weights (the cache's tensors never change)."""
        return all(layer.attn.qkv._packed is qkv[7] and layer.mlp.down._packed is dg[7]
                   for (_, qkv, _, _, _, dg, _, _), layer in zip(self.layers, self.model.layers))

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], positions: Sequence[int], rows: Sequence[int],
             logits_for: Optional[Sequence[int]] = None) -> torch.Tensor:
        """logits_for: the indices of the tokens whose logits are wanted (default all) -> [len, V]."""
        M = len(tokens)
        if M < 1 or len(positions) != M or len(rows) != M:
            raise ValueError(f"{M} tokens at {len(positions)} positions in {len(rows)} cache rows")
        last: dict = {}
        for p, r in zip(positions, rows):
            if not 0 <= r < self.rows:
                raise ValueError(f"cache row {r} outside the cache rows [0, {self.rows})")
            if not 0 <= p < self.max_seq:
                raise ValueError(f"position {p} outside the cache of {self.max_seq}")
            if r in last and p != last[r] + 1:
                raise ValueError(f"cache row {r}: positions {last[r]} then {p}; a row's tokens in one step "
                                 "take consecutive positions, in order")
            last[r] = p
        if M > self.capacity:
            self._buffers(M)
        ext, model = self.ext, self.model
        C, H, G, D, F = self.C, self.H, self.G, self.D, self.F
        x, h, qkv, y, a, mm, u, g = (t[:M] for t in (self.x, self.h, self.qkv, self.y, self.a, self.m, self.u,
                                                     self.g))
        x.copy_(model.tok_embeddings(torch.tensor(list(tokens))))
        xp, hp, qp, yp, ap, mp, up, gp = (t.data_ptr() for t in (x, h, qkv, y, a, mm, u, g))
        # per token: its rotary row (its own position), its cache row (fp16 [G, P + max_seq, D], where it is
        # stored after the cache's P prefix positions and attends to them too), its slices of qkv and y
        P, S = self.cache.prefix_len, self.cache.k[0].shape[2]
        qkv_n, row_bytes = qkv.shape[1] * 4, 2 * G * S * D
        per_row = [(self.cos.data_ptr() + 4 * p * self.half, self.sin.data_ptr() + 4 * p * self.half,
                    r * row_bytes, qp + i * qkv_n, yp + i * H * D * 4, P + p)
                   for i, (p, r) in enumerate(zip(positions, rows))]
        stride, gemm, attend = S * D, ext.gemm, ext.attend
        for i, (w1, qg, og, w2, ug, dg, kc, vc) in enumerate(self.layers):
            ext.rmsnorm(xp, mp if i else 0, w1.data_ptr(), hp, M, C, self.eps)
            gemm(qg[0], hp, qg[1], qg[2], qg[3], qp, M, qg[4], qg[5], qg[6])
            kp, vp = kc.data_ptr(), vc.data_ptr()
            for cos_p, sin_p, off, q_i, y_i, p in per_row:
                attend(q_i, cos_p, sin_p, kp + off, vp + off, y_i, H, G, D, self.R, self.interleaved, p, p + 1,
                       stride)
            gemm(og[0], yp, og[1], og[2], og[3], ap, M, og[4], og[5], og[6])
            ext.rmsnorm(xp, ap, w2.data_ptr(), hp, M, C, self.eps)
            gemm(ug[0], hp, ug[1], ug[2], ug[3], up, M, ug[4], ug[5], ug[6])
            ext.swiglu(up, gp, M, F)
            gemm(dg[0], gp, dg[1], dg[2], dg[3], mp, M, dg[4], dg[5], dg[6])
        ext.rmsnorm(xp, mp, self.norm_w.data_ptr(), hp, M, C, self.eps)
        return model.output(h if logits_for is None else h[list(logits_for)])


def fast_decoder(model: GLM, cache: KVCache, current: Optional[FastDecoder] = None) -> Optional[FastDecoder]:
    """The fused decode path over `cache` (`current`, while still valid), or None where the model runs
    model.forward (why_not says why)."""
    if current is not None and current.cache is cache and current.valid():
        return current
    return FastDecoder(model, cache) if why_not(model, cache) is None else None
