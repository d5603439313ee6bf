"""Plain-PyTorch GLM, every generation from one set of modules (variants are ModelConfig fields).

Shapes at the boundaries: B batch, T new tokens, S key/value positions, H heads, G key/value groups, D head dim.

    ChatGLM-6B      LayerNorm, x = LN(x)*alpha + f(LN(x)) with alpha = sqrt(2L), per-head fused QKV,
                    2D rotary (position ids on the first half of each head, block position ids on the second,
                    rotate-half style), GELU(tanh) MLP, prefix attention: bidirectional before <sop>.
    ChatGLM2/3, GLM-4  RMSNorm, pre-norm residual, [q | k | v] fused QKV with bias, G < H key/value groups,
                    rotary on the first half of each head in interleaved pairs, SwiGLU, causal attention.

The KV cache is static and preallocated (setup_cache); a forward with `cache_pos` writes the new keys/values
at those positions and attends over the first `kv_len` cache slots. Rows of a batch may sit at different
positions (the server decodes several sequences together).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class SeqState(NamedTuple):
    """Per-row facts derived once from a prompt and used at every later step.

    ctx_len:  [B] tokens before <sop> (bidirectional context); 0 for causal models.
    mask_pos: [B] index of the [gMASK]/[MASK] that generated tokens take as their position; -1 if none.
    """
    ctx_len: torch.Tensor
    mask_pos: torch.Tensor


class Norm(nn.Module):
    def __init__(self, dim: int, kind: str, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        # RMSNorm in fp32, as the official code does, then back to the activation dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., R] by angles whose cos/sin are [..., R/2] (broadcast over heads)."""
    if interleaved:                                    # pairs (x0, x1), (x2, x3), ...
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)                        # first half / second half ("rotate_half")
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache(nn.Module):
    def __init__(self, batch: int, kv_heads: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int, row0: int = 0):
        """cache_pos [B, T]; k, v [B, G, T, D] into cache rows row0..row0+B-1
        -> keys/values [B, G, kv_len, D] (views of the cache)."""
        B = k.shape[0]
        rows = torch.arange(row0, row0 + B, device=k.device)[:, None]
        # advanced indices (rows, positions) around a slice put [B, T] first: [B, T, G, D]
        self.k[rows, :, cache_pos] = k.transpose(1, 2).to(self.k.dtype)
        self.v[rows, :, cache_pos] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[row0:row0 + B, :, :kv_len], self.v[row0:row0 + B, :, :kv_len]


class Attention(nn.Module):
    fp32_softmax = False           # training under bf16/fp16 autocast: scores and softmax in fp32 (GLM-130B)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.qkv_bias)
        self.out = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.out_bias)
        self.cache: Optional[KVCache] = None

    def _split_qkv(self, qkv: torch.Tensor):
        cfg = self.cfg
        B, T, _ = qkv.shape
        H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if cfg.qkv_layout == "per_head":               # ChatGLM-6B: [H, (q, k, v), D]
            q, k, v = qkv.view(B, T, H, 3 * D).split(D, dim=-1)
        else:                                          # [q (H*D) | k (G*D) | v (G*D)]
            q, k, v = qkv.split([H * D, G * D, G * D], dim=-1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, G, D), v.view(B, T, G, D)
        return q, k, v

    def _rope(self, x: torch.Tensor, rope) -> torch.Tensor:
        cfg = self.cfg
        R = cfg.rope_dim
        if cfg.rope_2d:                                # two position streams, one per half of the head
            (c1, s1), (c2, s2) = rope
            a = apply_rope(x[..., :R], c1, s1, cfg.rope_interleaved)
            b = apply_rope(x[..., R:2 * R], c2, s2, cfg.rope_interleaved)
            return torch.cat((a, b, x[..., 2 * R:]), dim=-1)
        (c, s), = rope
        return torch.cat((apply_rope(x[..., :R], c, s, cfg.rope_interleaved), x[..., R:]), dim=-1)

    def forward(self, x, rope, mask, cache_pos=None, kv_len=None, row0=0):
        """x [B, T, C]; rope: per position stream (cos, sin) [B, T, 1, R/2]; mask [B, 1, T, S] bool (True = see)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = self._split_qkv(self.qkv(x))
        q, k = self._rope(q, rope).to(x.dtype), self._rope(k, rope).to(x.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # [B, H|G, T, D]
        if cache_pos is not None:
            k, v = self.cache.update(cache_pos, k, v, kv_len, row0)            # [B, G, S, D]
            if k.dtype != q.dtype:                                              # an fp16 cache (quantized)
                k, v = k.to(q.dtype), v.to(q.dtype)
        S = k.shape[2]
        # Fold the H/G query heads that share a key/value group into the query axis, so the grouped keys
        # are used as they are (no copy): q [B, G, (H/G)*T, D] against k [B, G, S, D].
        rep = H // G
        q = q.reshape(B, G, rep * T, D)
        if mask is None:                               # every cached key is visible (one-row decode)
            m = None
        else:
            m = mask.unsqueeze(2).expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S) if rep > 1 else mask
        if self.fp32_softmax and q.dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(q.device.type, enabled=False):     # else autocast casts back down
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=m)           # [B, G, rep*T, D]
        y = y.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        inner = cfg.ffn_hidden_size * (2 if self.swiglu else 1)
        self.up = nn.Linear(cfg.hidden_size, inner, bias=cfg.mlp_bias)       # dense_h_to_4h (gate | up)
        self.down = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.glm_residual, self.alpha = cfg.glm_residual, cfg.residual_alpha

    def forward(self, x, rope, mask, cache_pos=None, kv_len=None, row0=0):
        h = self.attn_norm(x)
        a = self.attn(h, rope, mask, cache_pos, kv_len, row0)
        # ChatGLM-6B keeps the *normalised* input on the residual path, scaled by alpha
        x = h * self.alpha + a if self.glm_residual else x + a
        h = self.ffn_norm(x)
        m = self.mlp(h)
        return h * self.alpha + m if self.glm_residual else x + m


class GLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope_table: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.cache_batch = self.cache_len = 0

    # --- rotary table --------------------------------------------------------------------------------
    def rope_table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [max_seq_len, R/2] in fp32, built on first use (kept out of state_dict and of .to(dtype))."""
        t = self._rope_table
        if t is None or t[0].device != torch.device(device):
            cfg = self.config
            R = cfg.rope_dim
            inv = 1.0 / (cfg.rope_base ** (torch.arange(0, R, 2, dtype=torch.float32, device=device) / R))
            if cfg.rope_fp16_freqs:                   # ChatGLM-6B stores inv_freq in fp16
                inv = inv.half().float()
            pos = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
            ang = torch.outer(pos, inv)
            self._rope_table = t = (ang.cos(), ang.sin())
        return t

    # --- sequence state (ChatGLM-6B positions and prefix mask) ---------------------------------------
    def sequence_state(self, input_ids: torch.Tensor) -> SeqState:
        """From prompt ids [B, T]: where the bidirectional context ends and which mask token positions refer to.

        As the official ChatGLM-6B code: context = tokens before the first <sop> (all of them if there is none);
        the mask position is the first [gMASK], else the first [MASK] (else, our extension, [sMASK]).
        """
        cfg = self.config
        B, T = input_ids.shape
        dev = input_ids.device
        if not cfg.prefix_lm and not cfg.rope_2d:
            z = torch.zeros(B, dtype=torch.long, device=dev)
            return SeqState(z, z - 1)
        ctx, mpos = [], []
        for row in input_ids.tolist():
            ctx.append(row.index(cfg.sop_token_id) if cfg.sop_token_id in row else len(row))
            m = -1
            for tok in (cfg.gmask_token_id, cfg.mask_token_id, cfg.smask_token_id):
                if tok is not None and tok in row:
                    m = row.index(tok)
                    break
            mpos.append(m)
        return SeqState(torch.tensor(ctx, device=dev), torch.tensor(mpos, device=dev))

    def _rope_for(self, cache_pos: torch.Tensor, state: SeqState, position_ids: Optional[torch.Tensor]):
        cos, sin = self.rope_table(cache_pos.device)

        def look(p):                                   # p [B, T] -> ([B, T, 1, R/2], [B, T, 1, R/2])
            return cos[p].unsqueeze(2), sin[p].unsqueeze(2)

        cfg = self.config
        if not cfg.rope_2d:
            p = cache_pos if position_ids is None else position_ids
            return (look(p),)
        if position_ids is not None:                   # [B, 2, T]
            return look(position_ids[:, 0]), look(position_ids[:, 1])
        ctx = state.ctx_len[:, None]
        mpos = state.mask_pos[:, None]
        in_ctx = cache_pos < ctx
        pos = torch.where(in_ctx | (mpos < 0), cache_pos, mpos)
        block = torch.where(in_ctx, torch.zeros_like(cache_pos), cache_pos - ctx + 1)
        return look(pos), look(block)

    def _mask_for(self, cache_pos: torch.Tensor, key_pos: torch.Tensor, state: SeqState) -> torch.Tensor:
        """[B, 1, T, S] bool: causal, plus (prefix LM) every key inside the bidirectional context."""
        q = cache_pos[:, :, None]                      # [B, T, 1]
        k = key_pos.view(1, 1, -1) if key_pos.dim() == 1 else key_pos[:, None, :]
        m = k <= q
        if self.config.prefix_lm:
            m = m | (k < state.ctx_len[:, None, None])
        return m.unsqueeze(1)

    # --- where and in what dtype activations live (the norm weights: never quantized) ---------------
    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    # --- cache ---------------------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_seq: int, dtype=None, device=None):
        """Preallocate keys/values for `batch` rows of up to `max_seq` positions (<= config.max_seq_len)."""
        cfg = self.config
        if max_seq > cfg.max_seq_len:
            raise ValueError(f"cache of {max_seq} positions exceeds the model's {cfg.max_seq_len}")
        device = device or self.device
        if dtype is None:
            # quantized models compute in fp32 on CPU; their cache is kept in fp16 (half the memory: 58 MB
            # instead of 117 MB for ChatGLM3-6B at 2048 positions; converted back per step, F16C does it fast)
            dtype = torch.float16 if cfg.quantization and self.dtype == torch.float32 else self.dtype
        for layer in self.layers:
            layer.attn.cache = KVCache(batch, cfg.num_kv_heads, max_seq, cfg.head_dim, dtype, device)
        self.cache_batch, self.cache_len = batch, max_seq

    def move_cache_row(self, src: int, dst: int, length: int):
        """Copy the first `length` cached positions of row src into row dst (the server compacts its rows)."""
        for layer in self.layers:
            c = layer.attn.cache
            c.k[dst, :, :length] = c.k[src, :, :length]
            c.v[dst, :, :length] = c.v[src, :, :length]

    def drop_cache(self):
        for layer in self.layers:
            layer.attn.cache = None
        self.cache_batch = self.cache_len = 0

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache_pos: Optional[torch.Tensor] = None,
                state: Optional[SeqState] = None, kv_len: Optional[int] = None,
                position_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                last_only: bool = False, cache_row0: int = 0) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] ([B, 1, V] with last_only).

        Without cache_pos: a full forward with the generation's default positions and masks (ChatGLM-6B's
        derived from [gMASK]/[MASK]/<sop> in the ids). With cache_pos [B, T]: the tokens sit at those positions
        of their sequences; keys/values go into cache rows cache_row0.. and attention covers cache slots
        [0, kv_len).
        `state` comes from sequence_state(prompt) (derived from input_ids when absent). position_ids
        ([B, T], or [B, 2, T] for 2D) and attention_mask ([B, 1, T, S] bool) override the defaults.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        if state is None:
            state = self.sequence_state(input_ids)
        if cache_pos is None:
            cache_pos = torch.arange(T, device=dev).expand(B, T)
            key_pos = cache_pos
            use_cache = False
        else:
            if self.cache_len == 0:
                raise RuntimeError("call setup_cache() before a forward with cache_pos")
            kv_len = kv_len if kv_len is not None else self.cache_len
            key_pos = torch.arange(kv_len, device=dev)
            use_cache = True
        rope = self._rope_for(cache_pos, state, position_ids)
        mask = attention_mask if attention_mask is not None else self._mask_for(cache_pos, key_pos, state)
        if attention_mask is None and T == 1 and bool(mask.all()):
            mask = None                                # decode step seeing all its keys: SDPA needs no mask

        x = self.tok_embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, rope, mask, cache_pos if use_cache else None, kv_len, cache_row0)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))

    # --- construction helpers ------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, seed: Optional[int] = None):
        """Random init for fresh models (training from scratch, tests, benchmarks)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                w = torch.empty(mod.weight.shape, dtype=torch.float32)
                w.normal_(0.0, std, generator=g)
                with torch.no_grad():
                    mod.weight.copy_(w)
                if isinstance(mod, nn.Linear) and mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, Norm):
                nn.init.ones_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        return self
