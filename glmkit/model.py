"""Plain-PyTorch GLM, every generation from one set of modules (variants are ModelConfig fields).

Shapes at the boundaries: B batch, T new tokens, S key/value positions, H heads, G key/value groups, D head dim.

    ChatGLM-6B      LayerNorm, x = LN(x)*alpha + f(LN(x)) with alpha = sqrt(2L), per-head fused QKV,
                    2D rotary (position ids on the first half of each head, block position ids on the second,
                    rotate-half style), GELU(tanh) MLP, prefix attention: bidirectional before <sop>.
    GLM (2021)      learned position and block-position embeddings added to the token embeddings (no rotary),
                    pre-LN with biased LayerNorm, [q | k | v] fused QKV, exact GELU MLP, tied output, prefix
                    attention as ChatGLM-6B; the mask position is the first mask token of any kind.
    ChatGLM2/3, GLM-4  RMSNorm, pre-norm residual, [q | k | v] fused QKV with bias, G < H key/value groups,
                    rotary on the first half of each head in interleaved pairs, SwiGLU, causal attention.
    GLM-130B        ChatGLM-6B's LayerNorm/alpha residual (DeepNorm), per-head QKV and prefix attention, but
                    1D rotary over the whole head dim (the span at its mask's position), GeGLU, tied output.

The KV cache is an object the caller owns and passes in (glmkit/engine/cache.py's KVCache; the model keeps no
state between calls). Its one method the model uses:

    cache.update(layer, k, v, cache_pos, kv_len, row0) -> (keys, values)
        k, v [B, G, T, D] of this call's tokens go to positions cache_pos [B, T] of cache rows row0..row0+B-1;
        returned: the keys/values of positions [0, kv_len) of those rows, [B, G, P + kv_len, D], after the
        cache's P = cache.prefix_len virtual tokens (P-tuning v2: keys/values every query sees, with no
        position of their own; 0 for a plain cache). adapters/ptuning.py's PrefixKV is such an object without
        any storage, for full forwards (training).

Rows of a batch may sit at different positions (the engine decodes several sequences together).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .config import ModelConfig


class SeqState(NamedTuple):
    """Per-row facts derived once from a prompt and used at every later step.

    ctx_len:  [B] tokens before <sop> (bidirectional context); 0 for causal models.
    mask_pos: [B] index of the [gMASK]/[MASK] that generated tokens take as their position; -1 if none.
    """
    ctx_len: torch.Tensor
    mask_pos: torch.Tensor


class CausalMask(NamedTuple):
    """A causal mask left unmaterialised (long prompts: a [T, S] bool mask of an 8K prompt is 64 MB, 1 GB once
    expanded over ChatGLM3's 16 query heads per group, and SDPA converts it to float). Query t of row b sees the
    cache's prefix_len virtual tokens and key positions <= pos[b, t]; Attention builds the mask a block of
    queries at a time, each block attending only to the keys up to its last position."""
    pos: torch.Tensor                 # [B, T] the queries' cache positions
    prefix_len: int


LAZY_MASK_ELEMENTS = 1 << 22          # T x S from which attention_inputs hands out a CausalMask (2K x 2K)
MASK_BLOCK_ELEMENTS = 1 << 24         # (H/G) x query rows x keys of one block's mask


class Positions(NamedTuple):
    """What stands in for the rotary tables of a model with learned 2D positions (pos_embedding "learned_2d"):
    the position and block-position ids [B, T] of the tokens, which embed() looks up and adds."""
    pos: torch.Tensor
    block: torch.Tensor


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


class Attention(nn.Module):
    fp32_softmax = False           # training under bf16/fp16 autocast: scores and softmax in fp32 (GLM-130B)

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.cfg, self.index = cfg, index              # index: this layer's place in the KV cache
        self.qkv = nn.Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.qkv_bias)
        self.out = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.out_bias)

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
        if isinstance(rope, Positions):                # learned positions: added to the embeddings instead
            return x
        R = cfg.rope_dim
        if cfg.rope_2d:                                # two position streams, one per half of the head
            (c1, s1), (c2, s2) = rope
            a = apply_rope(x[..., :R], c1, s1, cfg.rope_interleaved)
            b = apply_rope(x[..., R:2 * R], c2, s2, cfg.rope_interleaved)
            return torch.cat((a, b, x[..., 2 * R:]), dim=-1)
        (c, s), = rope
        return torch.cat((apply_rope(x[..., :R], c, s, cfg.rope_interleaved), x[..., R:]), dim=-1)

    def forward(self, x, rope, mask, cache=None, cache_pos=None, kv_len=None, row0=0):
        """x [B, T, C]; rope: per position stream (cos, sin) [B, T, 1, R/2]; mask [B, 1, T, S] bool (True = see),
        None (every key visible) or a CausalMask."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, D = cfg.num_heads, cfg.head_dim
        q, k, v = self._split_qkv(self.qkv(x))
        q, k = self._rope(q, rope).to(x.dtype), self._rope(k, rope).to(x.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # [B, H|G, T, D]
        if cache is not None:
            k, v = cache.update(self.index, k, v, cache_pos, kv_len, row0)     # [B, G, S, D]
            if k.dtype != q.dtype:                                              # an fp16 cache (quantized)
                k, v = k.to(q.dtype), v.to(q.dtype)
        if isinstance(mask, CausalMask):
            y = self._causal_blocks(q, k, v, mask)
        else:
            y = self._attend(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.out(y)

    def _attend(self, q, k, v, mask):
        """q [B, H, T, D], k/v [B, G, S, D], mask [B, 1, T, S] bool or None -> [B, H, T, D]."""
        B, H, T, D = q.shape
        G, S = k.shape[1], k.shape[2]
        # Fold the H/G query heads that share a key/value group into the query axis, so the grouped keys
        # are used as they are (no copy): q [B, G, (H/G)*T, D] against k [B, G, S, D].
        rep = H // G
        q = q.reshape(B, G, rep * T, D)
        if mask is None:                               # every cached key is visible (one-row decode)
            m = None
        else:
            m = mask.unsqueeze(2).expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S) if rep > 1 else mask
        if (self.fp32_softmax or self.cfg.attn_fp32_softmax) and q.dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(q.device.type, enabled=False):     # else autocast casts back down
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=m)           # [B, G, rep*T, D]
        return y.reshape(B, H, T, D)

    def _causal_blocks(self, q, k, v, mask: CausalMask):
        """Causal attention a block of queries at a time: each block's mask [B, 1, rows, keys up to its last
        position] is built for it, so no [T, S] mask exists and keys after a block are not even read."""
        B, H, T, D = q.shape
        G, S = k.shape[1], k.shape[2]
        P = mask.prefix_len
        rows = max(1, MASK_BLOCK_ELEMENTS // ((H // G) * S))
        key_pos = torch.arange(S, device=q.device) - P              # the prefix's keys: negative, always seen
        out = []
        for i in range(0, T, rows):
            pos = mask.pos[:, i:i + rows]                                       # [B, t]
            hi = min(S, P + int(pos.max()) + 1)
            m = (key_pos[None, None, :hi] <= pos[:, :, None]).unsqueeze(1)      # [B, 1, t, hi]
            out.append(self._attend(q[:, :, i:i + rows], k[:, :, :hi], v[:, :, :hi], m))
        return torch.cat(out, dim=2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        self.gelu = "none" if cfg.activation == "gelu_erf" else "tanh"
        self.geglu = cfg.activation == "geglu"
        inner = cfg.ffn_hidden_size * (2 if self.swiglu or self.geglu else 1)
        self.up = nn.Linear(cfg.hidden_size, inner, bias=cfg.mlp_bias)       # dense_h_to_4h (gate | up)
        self.down = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.geglu:                               # GLM-130B: [a | b] -> a * gelu(b), erf GELU
            a, b = h.chunk(2, dim=-1)
            h = a * F.gelu(b)
        else:
            h = F.gelu(h, approximate=self.gelu)
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.attn_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps)
        self.attn = Attention(cfg, index)
        self.ffn_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.glm_residual, self.alpha = cfg.glm_residual, cfg.residual_alpha

    def forward(self, x, rope, mask, cache=None, cache_pos=None, kv_len=None, row0=0):
        h = self.attn_norm(x)
        a = self.attn(h, rope, mask, cache, cache_pos, kv_len, row0)
        # ChatGLM-6B keeps the *normalised* input on the residual path, scaled by alpha
        x = h * self.alpha + a if self.glm_residual else x + a
        h = self.ffn_norm(x)
        m = self.mlp(h)
        return h * self.alpha + m if self.glm_residual else x + m


class _HeadCE(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i) with its gradients made in the forward pass, rows chunks at a time: per chunk
    logits [rows, V] -> softmax - onehot -> grad_h rows (and grad_W += g^T h when W trains). Memory: one
    chunk of logits instead of all of them; work: the same matmuls as autograd, nothing recomputed."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows):                 # h [N, C], weight [V, C], targets [N]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], rows):
            hc, tc = h[i:i + rows], targets[i:i + rows]
            logits = F.linear(hc, weight).float()                                   # [n, V]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            g = logits.sub_(lse[:, None]).exp_()                                    # softmax, in place
            g[torch.arange(len(tc), device=g.device), tc] -= 1.0                    # - onehot
            if need_h:
                gh[i:i + rows] = (g.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                gw.addmm_(g.t(), hc.float())
        ctx.save_for_backward(gh, gw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        gh, gw = ctx.saved_tensors
        return (gh * grad_total if gh is not None else None,
                (gw * grad_total).to(ctx.weight_dtype) if gw is not None else None, None, None)


class GLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.pos_embedding == "learned_2d":         # original GLM: position and block-position tables
            self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
            self.block_pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._rope_table: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.grad_checkpointing = False     # training: recompute each block's activations in the backward pass

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
        if cfg.mask_positions_1d:
            return self._sequence_state_130b(input_ids)
        ctx, mpos = [], []
        masks = [t for t in (cfg.gmask_token_id, cfg.mask_token_id, cfg.smask_token_id) if t is not None]
        for row in input_ids.tolist():
            ctx.append(row.index(cfg.sop_token_id) if cfg.sop_token_id in row else len(row))
            if cfg.first_mask_any:                     # original GLM (build_inputs_for_generation): the first
                mpos.append(next((i for i, t in enumerate(row) if t in masks), -1))     # mask of any kind
                continue
            mpos.append(next((row.index(t) for t in masks if t in row), -1))
        return SeqState(torch.tensor(ctx, device=dev), torch.tensor(mpos, device=dev))

    def _positions_2d(self, cache_pos: torch.Tensor, state: SeqState) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM's 2D positions from cache positions: the context counts 0.. with block position 0; from <sop> on
        every token sits at the mask position with block positions 1, 2, ..."""
        ctx = state.ctx_len[:, None]
        mpos = state.mask_pos[:, None]
        in_ctx = cache_pos < ctx
        pos = torch.where(in_ctx | (mpos < 0), cache_pos, mpos)
        block = torch.where(in_ctx, torch.zeros_like(cache_pos), cache_pos - ctx + 1)
        return pos, block

    def _sequence_state_130b(self, input_ids: torch.Tensor) -> SeqState:
        """GLM-130B (generate.py): context = tokens before <sop>; generated tokens take the position of the
        first [MASK], else of the first [sMASK]; with neither ([gMASK] only) positions simply go on (-1)."""
        cfg = self.config
        ctx, mpos = [], []
        for row in input_ids.tolist():
            ctx.append(row.index(cfg.sop_token_id) if cfg.sop_token_id in row else len(row))
            m = next((row.index(t) for t in (cfg.mask_token_id, cfg.smask_token_id) if t in row), -1)
            mpos.append(m)
        dev = input_ids.device
        return SeqState(torch.tensor(ctx, device=dev), torch.tensor(mpos, device=dev))

    def _rope_for(self, cache_pos: torch.Tensor, state: SeqState, position_ids: Optional[torch.Tensor]):
        if self.config.pos_embedding == "learned_2d":
            if position_ids is not None:               # [B, 2, T]
                return Positions(position_ids[:, 0], position_ids[:, 1])
            # an engine's idle scratch rows (max_seq - 1 with no context) may reach one past the table
            pos, block = self._positions_2d(cache_pos, state)
            return Positions(pos, block.clamp(max=self.config.max_seq_len - 1))
        cos, sin = self.rope_table(cache_pos.device)

        def look(p):                                   # p [B, T] -> ([B, T, 1, R/2], [B, T, 1, R/2])
            return cos[p].unsqueeze(2), sin[p].unsqueeze(2)

        cfg = self.config
        if not cfg.rope_2d:
            p = cache_pos if position_ids is None else position_ids
            if position_ids is None and cfg.mask_positions_1d:     # GLM-130B: <sop> on at the mask
                keep = (cache_pos < state.ctx_len[:, None]) | (state.mask_pos[:, None] < 0)
                p = torch.where(keep, cache_pos, state.mask_pos[:, None])
            return (look(p),)
        if position_ids is not None:                   # [B, 2, T]
            return look(position_ids[:, 0]), look(position_ids[:, 1])
        pos, block = self._positions_2d(cache_pos, state)
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

    # --- forward, and its pieces (the engine runs a layer range at a time for long bidirectional contexts) -----
    def attention_inputs(self, input_ids: torch.Tensor, cache_pos: Optional[torch.Tensor] = None,
                         kv_len: Optional[int] = None, state: Optional[SeqState] = None,
                         position_ids: Optional[torch.Tensor] = None,
                         attention_mask: Optional[torch.Tensor] = None, prefix_len: int = 0):
        """-> (rope, mask, cache_pos) for tokens input_ids [B, T] at cache_pos [B, T] (default 0..T-1) attending
        to key positions [0, kv_len) (default: the tokens themselves), after prefix_len virtual tokens that
        every query sees.

        What the caller gives is used as given; only what is missing is derived: positions from cache_pos
        (ChatGLM-6B's 2D positions from the SeqState), the mask causal (plus ChatGLM-6B's bidirectional
        context). The SeqState is derived from input_ids only when a missing piece needs it.
        mask None means every key is visible (a decode step of one row, or a bidirectional context); a long
        plain causal mask (T x S >= LAZY_MASK_ELEMENTS) comes as a CausalMask, built a block at a time."""
        cfg = self.config
        B, T = input_ids.shape
        given_pos = cache_pos is not None
        if cache_pos is None:
            cache_pos = torch.arange(T, device=input_ids.device).expand(B, T)
        two_d = cfg.rope_2d or cfg.pos_embedding == "learned_2d" or cfg.mask_positions_1d
        needs_state = (position_ids is None and two_d) or (attention_mask is None and cfg.prefix_lm)
        if needs_state and state is None:
            state = self.sequence_state(input_ids)
        rope = self._rope_for(cache_pos, state, position_ids)
        mask = attention_mask
        if mask is None:
            keys = cache_pos if kv_len is None else torch.arange(kv_len, device=input_ids.device)
            if (not cfg.prefix_lm and T * keys.shape[-1] >= LAZY_MASK_ELEMENTS
                    and (kv_len is not None or not given_pos)):          # key j is position j
                return rope, CausalMask(cache_pos, prefix_len), cache_pos
            mask = self._mask_for(cache_pos, keys, state)
            if bool(mask.all()):
                mask = None                            # SDPA needs no mask when every key is visible
        if mask is not None and prefix_len:
            mask = torch.cat((mask.new_ones(*mask.shape[:-1], prefix_len), mask), dim=-1)
        return rope, mask, cache_pos

    def embed(self, input_ids: torch.Tensor, rope=None) -> torch.Tensor:
        """Token embeddings [B, T, C]; with learned positions (original GLM) plus the position and block-position
        embeddings of `rope` (the Positions attention_inputs returned for these tokens)."""
        x = self.tok_embeddings(input_ids)
        if self.config.pos_embedding == "learned_2d":
            if not isinstance(rope, Positions):
                raise ValueError("a model with learned positions embeds tokens with their Positions "
                                 "(model.embed(ids, attention_inputs(...)[0]))")
            x = x + self.pos_embeddings(rope.pos) + self.block_pos_embeddings(rope.block)
        return x

    def blocks(self, x: torch.Tensor, rope, mask, cache=None, cache_pos=None, kv_len=None, row0: int = 0,
               start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Hidden states [B, T, C] through layers [start, stop)."""
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers[start:stop]:
            if ckpt:                                   # keep only each block's input; redo the rest backwards
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, cache, cache_pos, kv_len, row0,
                                                      use_reentrant=False)
            else:
                x = layer(x, rope, mask, cache, cache_pos, kv_len, row0)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(x))

    def forward(self, input_ids: torch.Tensor, cache=None, cache_pos: Optional[torch.Tensor] = None,
                kv_len: Optional[int] = None, row0: int = 0, state: Optional[SeqState] = None,
                position_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                last_only: bool = False, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] ([B, 1, V] with last_only); with targets [B, T] (next-token ids,
        -100 where no loss): the summed cross-entropy instead (lm_loss), never the whole logits.

        Without a cache: a full forward over the tokens (positions 0..T-1 unless cache_pos / position_ids say
        otherwise). With `cache` (see the module docstring): the tokens sit at positions cache_pos [B, T] of
        cache rows row0..row0+B-1, their keys/values are written there and attention covers positions
        [0, kv_len) of each row.
        position_ids ([B, T], or [B, 2, T] for 2D) and attention_mask ([B, 1, T, S] bool) are used when given;
        what is not given is derived (attention_inputs), ChatGLM-6B's from `state` (sequence_state of the ids
        when absent: [gMASK]/[MASK]/<sop>).
        """
        prefix_len = 0
        if cache is not None:
            if cache_pos is None:
                raise ValueError("a forward with a KV cache needs cache_pos (the tokens' positions)")
            kv_len = kv_len if kv_len is not None else int(cache_pos.max()) + 1
            prefix_len = getattr(cache, "prefix_len", 0)
        rope, mask, cache_pos = self.attention_inputs(input_ids, cache_pos, kv_len, state, position_ids,
                                                      attention_mask, prefix_len)
        x = self.blocks(self.embed(input_ids, rope), rope, mask, cache, cache_pos, kv_len, row0)
        if targets is not None:
            return self.lm_loss(x, targets)
        if last_only:
            x = x[:, -1:]
        return self.head(x)

    def lm_loss(self, x: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                chunk_bytes: int = 128 << 20) -> torch.Tensor:
        """Summed cross-entropy (fp32) of the head over hidden states x [B, T, C] against targets [B, T].
        Only positions with a target go through the head, a chunk of rows at a time: the [B, T, V] logits
        (V = 65024: 133 MB a copy at 512 tokens, and softmax and gradient make several) never exist whole, and
        prompt tokens cost no head matmul. A plain nn.Linear head takes its gradients chunk by chunk in the
        forward pass (_HeadCE: no recompute); any other head (quantized, LoRA-wrapped) recomputes each chunk's
        logits in the backward pass."""
        keep = targets != ignore_index
        h, t = self.norm(x[keep]), targets[keep]                        # [N, C], [N]
        rows = max(1, chunk_bytes // (4 * self.config.vocab_size))
        zero = (x.sum() * 0.0).float()                 # keeps the graph for a micro-batch with no target
        if not torch.is_grad_enabled():
            return zero + sum((self._ce_sum(h[i:i + rows], t[i:i + rows]) for i in range(0, len(t), rows)),
                              torch.zeros((), device=x.device))
        out = self.output
        if type(out) is nn.Linear and out.bias is None:
            return zero + _HeadCE.apply(h, out.weight, t, rows)
        total = zero
        for i in range(0, h.shape[0], rows):
            total = total + torch.utils.checkpoint.checkpoint(self._ce_sum, h[i:i + rows], t[i:i + rows],
                                                              use_reentrant=False)
        return total

    def _ce_sum(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.output(h).float(), t, reduction="sum")

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
