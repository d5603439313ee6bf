"""The decode step of a quantized GLM on CPU, with no PyTorch op between the matrix multiplies.

model.py's forward is the reference and handles every case; for batch 1 it spends ~60 small PyTorch ops per
layer besides the four quantized GEMMs (norms, rotary, cache write, fp16 -> fp32 of the cached keys and values,
attention, SiLU * up, residual adds). Each op costs a few microseconds of dispatch on one thread: ~30 ms of a
~185 ms ChatGLM3-6B INT4 step on 2 cores. Here a layer is seven C calls on preallocated buffers:

  ChatGLM2/3, GLM-4 (RMSNorm, [q | k | v], 1D interleaved rotary, SwiGLU, causal):
    h = rmsnorm(x += m_prev)      qkv = gemm(h)      y = attend(qkv -> rotary, cache write, softmax(qK)V)
    a = gemm(y)                   h = rmsnorm(x += a)     u = gemm(h)     g = swiglu(u)     m = gemm(g)
  ChatGLM-6B (LayerNorm, x' = alpha * LN(x) + f(LN(x)), per-head [q, k, v], 2D rotary, GELU, prefix LM):
    h = layernorm(x += m_prev; x = alpha * h)     qkv = gemm(h)     y = attend(2D rotary, ...)     a = gemm(y)
    h = layernorm(x += a; x = alpha * h)          u = gemm(h)       g = gelu(u)     m = gemm(g)
    A prompt's bidirectional context (the tokens before <sop>) is written whole first, then each of its tokens
    attends to all of it; the tokens after it (the answer) attend causally.

(glmkit/kernels/decode_ops.c for the fused ops). The KV cache is fp16, or int8 with a scale per position and
group (KVCache(dtype=torch.int8): half the bytes again, for long contexts). It lives outside model.py because it
needs the kernels, and model.py imports only torch and the config. engine/step.py runs the decode steps of the
models whose matrices all run in the kernels through it; why_not() names what keeps a model on the reference
path. GLMKIT_FAST_DECODE=0 turns it off (A/B measurements). tests/test_fast_decode.py holds it to model.forward.
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


def _layout(cfg) -> Optional[str]:
    """'glm2' (ChatGLM2/3, GLM-4), 'chatglm' (ChatGLM-6B), or None for a mix the fused step does not know."""
    if getattr(cfg, "pos_embedding", "rope") != "rope":       # original GLM's learned position tables
        return None
    if (cfg.norm == "rmsnorm" and cfg.activation == "swiglu" and cfg.qkv_layout == "grouped"
            and not (cfg.rope_2d or cfg.prefix_lm or cfg.glm_residual)):
        return "glm2"
    if (cfg.norm == "layernorm" and cfg.activation == "gelu_tanh" and cfg.qkv_layout == "per_head"
            and cfg.rope_2d and cfg.glm_residual and cfg.num_kv_heads == cfg.num_heads):
        return "chatglm"
    return None


def kernel_layer(mod) -> bool:
    """A linear layer whose matrix multiply the kernels run (a QuantLinear, or a FloatLinear of fp16/bf16
    weights, packed for them; packs it)."""
    return type(mod) in (QuantLinear, FloatLinear) and mod.prepare()


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
    if _layout(cfg) is None:
        return ("needs the ChatGLM2/3 / GLM-4 layout (RMSNorm, SwiGLU, [q | k | v]) or ChatGLM-6B's (LayerNorm "
                "with the alpha residual, GELU, per-head qkv, 2D rotary)")
    for i, layer in enumerate(model.layers):
        for name, mod in (("attn.qkv", layer.attn.qkv), ("attn.out", layer.attn.out), ("mlp.up", layer.mlp.up),
                          ("mlp.down", layer.mlp.down)):
            if not kernel_layer(mod):
                return f"layers.{i}.{name} is not a quantized or fp16/bf16 layer on the kernels' path"
    if cache is not None and (cache.dtype not in (torch.float16, torch.int8)
                              or not all(t.is_contiguous() for t in cache.k + cache.v)
                              or cache.k[0].device.type != "cpu"):
        return f"needs a contiguous fp16 or int8 KV cache on CPU (this one is {cache.dtype})"
    return None


class FastDecoder:
    """step(tokens, positions, rows) -> logits [M, V]: token i at positions[i] of cache row rows[i] (earlier
    positions of each row already cached), equal to model.forward of the same step up to float summation order.
    A row may take several consecutive positions in one step (a piece of a prompt beside other rows' decode
    tokens): each token attends to its row's keys up to its own position, written in order -- or, ChatGLM-6B,
    a token inside its row's bidirectional context (ctx) to the whole context, which this step (or an earlier
    one) then writes whole.
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
        self.v1 = _layout(cfg) == "chatglm"
        self.alpha = float(cfg.residual_alpha)
        self.rows, self.max_seq = cache.slots, cache.max_seq
        self._buffers(self.rows)
        self.cos, self.sin = model.rope_table("cpu")
        self.half = self.cos.shape[1]
        self.layers = []
        for layer, k, v, ks, vs in zip(model.layers, cache.k, cache.v, cache.k_scale, cache.v_scale):
            self.layers.append((
                self._norm_args(layer.attn_norm), self._gemm_args(layer.attn.qkv), self._gemm_args(layer.attn.out),
                self._norm_args(layer.ffn_norm), self._gemm_args(layer.mlp.up), self._gemm_args(layer.mlp.down),
                (k, v, ks, vs)))
        self.final_norm = self._norm_args(model.norm)

    def _buffers(self, n: int):
        """Activation buffers for up to n tokens per step."""
        def buf(width):
            return torch.zeros(n, width, dtype=torch.float32)
        self.capacity = n
        up = self.F if self.v1 else 2 * self.F
        self.x, self.h, self.y = buf(self.C), buf(self.C), buf(self.H * self.D)
        self.qkv = buf(self.model.config.qkv_size)
        self.a, self.m, self.u, self.g = buf(self.C), buf(self.C), buf(up), buf(self.F)

    @staticmethod
    def _norm_args(norm):
        w = norm.weight.detach().contiguous()
        b = None if norm.bias is None else norm.bias.detach().contiguous()
        return (w.data_ptr(), 0 if b is None else b.data_ptr(), w, b)      # the tensors kept alive

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
                   for (_, qkv, _, _, _, dg, _), layer in zip(self.layers, self.model.layers))

    def _check(self, positions, rows, ctx):
        last: dict = {}
        for p, r, c in zip(positions, rows, ctx):
            if not 0 <= r < self.rows:
                raise ValueError(f"cache row {r} outside the cache rows [0, {self.rows})")
            if not 0 <= p < self.max_seq:
                raise ValueError(f"position {p} outside the cache of {self.max_seq}")
            if r in last and p != last[r] + 1:
                raise ValueError(f"cache row {r}: positions {last[r]} then {p}; a row's tokens in one step "
                                 "take consecutive positions, in order")
            last[r] = p
        for p, r, c in zip(positions, rows, ctx):
            if p < c and last[r] < c - 1:
                raise ValueError(f"cache row {r}: a token at {p} of a bidirectional context of {c} needs the rest "
                                 f"of the context in the same step (it ends at {last[r]})")

    def _rope_rows(self, positions, ctx, mask_pos):
        """Per token: the table rows (cos, sin addresses) of its one or two position streams (model._rope_for)."""
        cp, sp, hb = self.cos.data_ptr(), self.sin.data_ptr(), 4 * self.half
        if not self.v1:
            return [(cp + hb * p, sp + hb * p, 0, 0) for p in positions]
        out = []
        for p, c, m in zip(positions, ctx, mask_pos):
            p1, p2 = (p, 0) if p < c else (p if m < 0 else m, p - c + 1)
            out.append((cp + hb * p1, sp + hb * p1, cp + hb * p2, sp + hb * p2))
        return out

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], positions: Sequence[int], rows: Sequence[int],
             logits_for: Optional[Sequence[int]] = None, ctx: Optional[Sequence[int]] = None,
             mask_pos: Optional[Sequence[int]] = None) -> torch.Tensor:
        """logits_for: the indices of the tokens whose logits are wanted (default all) -> [len, V].
        ctx / mask_pos (ChatGLM-6B, per token): its row's bidirectional context length and [gMASK]/[MASK]
        position (SeqState); default 0 and -1 (causal)."""
        M = len(tokens)
        if M < 1 or len(positions) != M or len(rows) != M:
            raise ValueError(f"{M} tokens at {len(positions)} positions in {len(rows)} cache rows")
        ctx = [0] * M if ctx is None else [int(c) for c in ctx]
        mask_pos = [-1] * M if mask_pos is None else [int(m) for m in mask_pos]
        if len(ctx) != M or len(mask_pos) != M:
            raise ValueError(f"{M} tokens with {len(ctx)} context lengths and {len(mask_pos)} mask positions")
        self._check(positions, rows, ctx)
        if M > self.capacity:
            self._buffers(M)
        model = self.model
        x, h, qkv, y, a, mm, u, g = (t[:M] for t in (self.x, self.h, self.qkv, self.y, self.a, self.m, self.u,
                                                     self.g))
        x.copy_(model.tok_embeddings(torch.tensor(list(tokens))))
        attn = self._attention_plan(qkv.data_ptr(), y.data_ptr(), positions, rows, ctx, mask_pos)
        ptrs = tuple(t.data_ptr() for t in (x, h, qkv, y, a, mm, u, g))
        (self._layers_v1 if self.v1 else self._layers_glm2)(M, ptrs, attn)
        return model.output(h if logits_for is None else h[list(logits_for)])

    def _attention_plan(self, qp, yp, positions, rows, ctx, mask_pos):
        """The attend_ex calls of one layer: (mode, per-token args with the layer's cache addresses to add).
        Two passes (all writes, then all attention) when a bidirectional context is in the step, else one."""
        H, G, D = self.H, self.G, self.D
        cache = self.cache
        P, S = cache.prefix_len, cache.k[0].shape[2]
        elt = cache.k[0].element_size()
        row_bytes, srow_bytes = G * S * D * elt, G * S * 4
        qkv_n = self.model.config.qkv_size * 4
        if self.v1:                                    # [H, (q, k, v), D]
            koff, voff, qs = 4 * D, 8 * D, 3 * D
        else:                                          # [q (H*D) | k (G*D) | v (G*D)]
            koff, voff, qs = 4 * H * D, 4 * (H + G) * D, D
        calls = []
        for i, ((c1, s1, c2, s2), p, r, c) in enumerate(zip(self._rope_rows(positions, ctx, mask_pos), positions,
                                                              rows, ctx)):
            q = qp + i * qkv_n
            kv_len = P + (c if p < c else p + 1)
            calls.append((q, q + koff, q + voff, c1, s1, c2, s2, r * row_bytes, r * srow_bytes, yp + i * H * D * 4,
                          qs, P + p, kv_len))
        two_pass = any(p < c for p, c in zip(positions, ctx))
        return calls, two_pass, S * D

    def _attend(self, attn, kc, vc, ks, vs):
        calls, two_pass, stride = attn
        ext, H, G, D, R, il = self.ext, self.H, self.G, self.D, self.R, self.interleaved
        kp, vp = kc.data_ptr(), vc.data_ptr()
        ksp, vsp = (0, 0) if ks is None else (ks.data_ptr(), vs.data_ptr())
        for modes in ((1, 2) if two_pass else (3,)):
            for q, k, v, c1, s1, c2, s2, off, soff, y, qs, pos, kv_len in calls:
                ext.attend_ex(q, k, v, c1, s1, c2, s2, kp + off, vp + off, ksp and ksp + soff, vsp and vsp + soff,
                              y, H, G, D, R, il, qs, qs, pos, kv_len, stride, modes)

    def _layers_glm2(self, M, ptrs, attn):
        ext, C, F, eps = self.ext, self.C, self.F, self.eps
        xp, hp, qp, yp, ap, mp, up, gp = ptrs
        gemm = ext.gemm
        for i, ((w1, _, _, _), qg, og, (w2, _, _, _), ug, dg, kv) in enumerate(self.layers):
            ext.rmsnorm(xp, mp if i else 0, w1, hp, M, C, eps)
            gemm(qg[0], hp, qg[1], qg[2], qg[3], qp, M, qg[4], qg[5], qg[6])
            self._attend(attn, *kv)
            gemm(og[0], yp, og[1], og[2], og[3], ap, M, og[4], og[5], og[6])
            ext.rmsnorm(xp, ap, w2, hp, M, C, eps)
            gemm(ug[0], hp, ug[1], ug[2], ug[3], up, M, ug[4], ug[5], ug[6])
            ext.swiglu(up, gp, M, F)
            gemm(dg[0], gp, dg[1], dg[2], dg[3], mp, M, dg[4], dg[5], dg[6])
        ext.rmsnorm(xp, mp, self.final_norm[0], hp, M, C, eps)

    def _layers_v1(self, M, ptrs, attn):
        """ChatGLM-6B: x holds alpha * LN(x) after each norm, so adding the sublayer's output gives the
        block's residual x' = alpha * LN(x) + f(LN(x)); the final norm keeps x."""
        ext, C, F, eps, alpha = self.ext, self.C, self.F, self.eps, self.alpha
        xp, hp, qp, yp, ap, mp, up, gp = ptrs
        gemm = ext.gemm
        for i, ((w1, b1, _, _), qg, og, (w2, b2, _, _), ug, dg, kv) in enumerate(self.layers):
            ext.layernorm(xp, mp if i else 0, w1, b1, hp, M, C, eps, alpha)
            gemm(qg[0], hp, qg[1], qg[2], qg[3], qp, M, qg[4], qg[5], qg[6])
            self._attend(attn, *kv)
            gemm(og[0], yp, og[1], og[2], og[3], ap, M, og[4], og[5], og[6])
            ext.layernorm(xp, ap, w2, b2, hp, M, C, eps, alpha)
            gemm(ug[0], hp, ug[1], ug[2], ug[3], up, M, ug[4], ug[5], ug[6])
            ext.gelu(up, gp, M, F)
            gemm(dg[0], gp, dg[1], dg[2], dg[3], mp, M, dg[4], dg[5], dg[6])
        w, b = self.final_norm[:2]
        ext.layernorm(xp, mp, w, b, hp, M, C, eps, 0.0)


def fast_decoder(model: GLM, cache: KVCache, current: Optional[FastDecoder] = None) -> Optional[FastDecoder]:
    """The fused decode path over `cache` (`current`, while still valid), or None where the model runs
    model.forward (why_not says why)."""
    if current is not None and current.cache is cache and current.valid():
        return current
    return FastDecoder(model, cache) if why_not(model, cache) is None else None
