"""The training loop: batches -> AdamW steps, with validation, metrics, atomic checkpoints and exact resume.

One loop for pretraining and fine-tuning: what it trains on is a batch source (data.Batcher's packed
blank-infilling rows, finetune.py's chat examples) with
    next_rows(n) -> n rows          state() / load_state(st): the data position (saved in checkpoints)
    collate(rows, pad_id) -> {"input_ids", "targets"[, "position_ids", "attention_mask"]} tensors
    count(rows) -> (target tokens, input tokens)
and what it trains is any module that maps input_ids (+ the optional keys) to logits (a GLM; or a GLM wrapped
with its adapter, finetune.py), of which only the parameters that require grad are trained.

One step consumes one global batch of `rows` rows. Under torchrun each of the
W data-parallel ranks builds the same global batch from the shared cursor and trains on rows rank::W; the loss
of a step is the sum of token losses over the global batch divided by the global number of target tokens, so
the gradient (and the loss curve) is the same for any W and any micro-batch size, up to float summation order.

Stability options (GLM-130B): attention softmax in fp32 under autocast, the embedding-gradient shrink
emb = emb * a + emb.detach() * (1 - a), gradient clipping, linear warmup + cosine decay; bf16 autocast where
the hardware computes in bf16 (CUDA with bf16 support; not this AVX2 CPU, where fp32 is faster).

A checkpoint (`checkpoint.pt`: model, optimizer, step, data cursor, RNG states, configs) is written to a
temporary file, fsynced and renamed, so a run killed at any moment (SIGKILL included) resumes from the last
complete one and continues with the same losses as a run never stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ModelConfig
from ..model import GLM
# the torch.distributed setup is shared with tensor-parallel inference (glmkit/parallel/dist.py)
from ..parallel.dist import Dist, all_sum, init_distributed  # noqa: F401  (train/ imports them from here)


@dataclass
class TrainConfig:
    steps: int = 1000
    seq_len: int = 256
    rows: int = 16                      # packed rows per global batch (batch tokens = rows * seq_len)
    micro_rows: int = 0                 # rows per forward on each rank (0: all of the rank's rows at once)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    emb_grad_shrink: float = 1.0        # alpha of GLM-130B's embedding gradient shrink (1 = off, they used 0.1)
    fp32_softmax: bool = True           # only matters under autocast
    dtype: str = "auto"                 # auto | float32 | bfloat16 (autocast)
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 1
    seed: int = 0
    extra: dict = field(default_factory=dict)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine decay to lr * min_lr_ratio at `steps`."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def autocast_dtype(tc: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if tc.dtype == "float32":
        return None
    if tc.dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None                                           # auto on CPU: fp32 (no bf16 arithmetic on AVX2)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (weights touched per token: all but the embedding lookup) plus attention
    (12 x layers x width x context, PaLM's appendix B count with the average context seq_len / 2 ... we use
    the full seq_len as an upper bound)."""
    n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    return 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


# --- checkpoints -------------------------------------------------------------------------------------------

def atomic_torch_save(obj, path: Path):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:                                                  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# --- the loop --------------------------------------------------------------------------------------------

def param_groups(model: torch.nn.Module, wd: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def return_freed_memory(threshold: int = 128 << 10) -> bool:
    """glibc only: serve allocations over `threshold` bytes with their own mmap, so memory freed between the
    steps goes back to the OS at once. By default glibc raises that threshold as tensors come and go (up to
    32 MB), after which freed activations stay in its heap, fragmented: training LoRA on the INT4 ChatGLM3-6B
    (512 tokens) peaked 1.2 GiB higher in its forward pass that way (benchmarks/finetune.py). Costs a page
    fault per fresh page, little next to a training step. False where there is no glibc (macOS, musl)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def batch_loss(model, batch: dict, n_targets: int, amp: Optional[torch.dtype], device) -> torch.Tensor:
    """Sum of token cross-entropies / n_targets (the global count), so micro-batches and ranks add up.
    Positions and masks are used when the batch has them; the model derives them otherwise."""
    ids = batch["input_ids"].to(device)
    extra = {k: batch[k].to(device) for k in ("position_ids", "attention_mask") if batch.get(k) is not None}
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        # the model computes the loss itself (GLM.lm_loss): only target positions reach the head, a chunk at a
        # time, so the [B, T, V] logits are never held whole
        loss = model(ids, **extra, targets=batch["targets"].to(device))
    return loss / n_targets


class Trainer:
    """model: a GLM, or a module holding one as .glm (an adapter wrapper) with a .config. save_trainable: the
    checkpoint holds only the parameters that require grad (an adapter over a frozen base) instead of all."""

    def __init__(self, model: torch.nn.Module, tc: TrainConfig, batcher, val_rows: list, out: Path,
                 device: str = "cpu", dist_info: Optional[Dist] = None, pad_id: int = 0, export=None,
                 progress: bool = True, fsdp: bool = False, save_trainable: bool = False,
                 max_bad_steps: int = 3):
        self.tc, self.batcher, self.val_rows, self.out = tc, batcher, val_rows, Path(out)
        self.device = torch.device(device)
        return_freed_memory()                  # host memory (also on GPU runs: the optimizer, data, checkpoints)
        self.dist = dist_info or Dist()
        self.pad_id, self.export, self.progress = pad_id, export, progress
        self.save_trainable, self.max_bad_steps = save_trainable, max_bad_steps
        self.raw_model = model.to(self.device)
        glm = getattr(model, "glm", model)
        self.amp = autocast_dtype(tc, self.device)
        if tc.fp32_softmax:
            for layer in glm.layers:
                layer.attn.fp32_softmax = True
        self._emb_hook = None
        if tc.emb_grad_shrink != 1.0:
            a = tc.emb_grad_shrink
            self._emb_hook = glm.tok_embeddings.register_forward_hook(
                lambda _m, _i, out: out * a + out.detach() * (1 - a))
        self.model = model
        if self.dist.world > 1:
            if fsdp:
                # FSDP2: each block's parameters sharded over the ranks (works on CPU with gloo too)
                from torch.distributed.fsdp import fully_shard
                for layer in model.layers:
                    fully_shard(layer)
                fully_shard(model)
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP
                self.model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.fsdp = fsdp and self.dist.world > 1
        self.opt = torch.optim.AdamW(param_groups(self.model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas),
                                     eps=1e-8, fused=False)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.bad_steps = 0                                # non-finite losses in a row (steps skipped)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.metrics_path = self.out / "metrics.jsonl"

    # --- state ---------------------------------------------------------------------------------------
    def _full_state(self) -> tuple[dict, dict]:
        """(model, optimizer) state dicts as one process holds them (gathered to rank 0 under FSDP)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=opts),
                    get_optimizer_state_dict(self.model, self.opt, options=opts))
        if self.save_trainable:
            return ({k: p.detach() for k, p in self.raw_model.named_parameters() if p.requires_grad},
                    self.opt.state_dict())
        return self.raw_model.state_dict(), self.opt.state_dict()

    def save(self):
        model_state, optim_state = self._full_state()
        if not self.dist.main:
            return
        atomic_torch_save({
            "model": model_state, "optimizer": optim_state, "step": self.step,
            "tokens_seen": self.tokens_seen, "elapsed": self.elapsed, "data": self.batcher.state(),
            "rng": rng_state(), "train_config": asdict(self.tc), "model_config": self.raw_model.config.to_dict(),
            "world": self.dist.world,
        }, self.ckpt_path)
        if self.export is not None:
            if self.fsdp:                                 # sharded parameters: export a gathered copy
                m = GLM(self.raw_model.config)
                m.load_state_dict(model_state)
                self.export(m)
            else:
                self.export(self.raw_model)

    def load(self, path: Optional[Path] = None):
        ck = torch.load(path or self.ckpt_path, map_location="cpu", weights_only=False)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, ck["model"], options=opts)
            set_optimizer_state_dict(self.model, self.opt, ck["optimizer"], options=opts)
        else:
            missing, unexpected = self.raw_model.load_state_dict(ck["model"], strict=not self.save_trainable)
            if unexpected or (self.save_trainable and set(ck["model"]) != {
                    k for k, p in self.raw_model.named_parameters() if p.requires_grad}):
                raise RuntimeError(f"{path or self.ckpt_path}: its parameters are not this run's trainable ones "
                                   f"(another method or target modules?)")
            self.opt.load_state_dict(ck["optimizer"])
        self.step, self.tokens_seen, self.elapsed = ck["step"], ck["tokens_seen"], ck["elapsed"]
        self.batcher.load_state(ck["data"])
        set_rng_state(ck["rng"])
        return ck

    def log(self, rec: dict):
        if self.dist.main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    # --- steps ---------------------------------------------------------------------------------------
    def _rank_rows(self, rows: list) -> list:
        return rows[self.dist.rank::self.dist.world]

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over the next global batch -> (loss, non-pad input tokens of the global batch)."""
        tc = self.tc
        rows = self.batcher.next_rows(tc.rows)
        n_targets, n_tokens = self.batcher.count(rows)
        mine = self._rank_rows(rows)
        micro = tc.micro_rows or max(1, len(mine))
        chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)] or [[]]
        lr = lr_at(self.step, tc)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        total = torch.zeros((), dtype=torch.float64)
        for i, chunk in enumerate(chunks):
            if not chunk:
                continue
            batch = self.batcher.collate(chunk, self.pad_id)
            # DDP averages gradients over ranks: scale by W so the sum over ranks is what one process computes
            loss = batch_loss(self.model, batch, n_targets, self.amp, self.device)
            sync = i == len(chunks) - 1
            if self.fsdp:                                 # gradient accumulation: reduce on the last one only
                self.model.set_requires_gradient_sync(sync)
                ctx = contextlib.nullcontext()
            else:
                ctx = self.model.no_sync() if (self.dist.world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                (loss * self.dist.world).backward()
            total += loss.detach().double().cpu()
        total = float(all_sum(total, self.dist))
        if not math.isfinite(total):                      # skip the update; run() stops after a few in a row
            self.opt.zero_grad(set_to_none=True)
            self.bad_steps += 1
            return total, n_tokens
        self.bad_steps = 0
        if tc.grad_clip > 0:                              # (FSDP2's sharded gradients are DTensors: same call)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return total, n_tokens

    @torch.no_grad()
    def validate(self) -> Optional[float]:
        if not self.val_rows:
            return None
        self.model.eval()
        n_targets, _ = self.batcher.count(self.val_rows)
        mine = self._rank_rows(self.val_rows)
        micro = self.tc.micro_rows or 8
        total = torch.zeros((), dtype=torch.float64)
        for i in range(0, len(mine), micro):
            batch = self.batcher.collate(mine[i:i + micro], self.pad_id)
            total += batch_loss(self.model, batch, n_targets, self.amp, self.device).double().cpu()
        return float(all_sum(total, self.dist))

    def run(self) -> dict:
        tc = self.tc
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.dist.main), file=sys.stderr)
        last_val = None
        start_tokens, start_time = self.tokens_seen, self.elapsed      # this process's share (resume)
        while self.step < tc.steps:
            t0 = time.perf_counter()
            loss, n_tok = self.train_step()
            dt = time.perf_counter() - t0
            if not math.isfinite(loss):
                msg = (f"loss is {loss} at step {self.step + 1}: the step was skipped ({self.bad_steps} in a row; "
                       f"the run stops at {self.max_bad_steps})")
                if self.dist.main:
                    print(f"warning: {msg}", file=sys.stderr, flush=True)
                self.log({"type": "skipped", "step": self.step + 1, "loss": str(loss)})
                if self.bad_steps >= self.max_bad_steps:
                    raise RuntimeError(f"{self.max_bad_steps} non-finite losses in a row at step {self.step + 1}: "
                                       f"stopped; the last good checkpoint ({self.ckpt_path}) is kept. Lower "
                                       "--lr, or check the data")
                continue
            self.tokens_seen += n_tok
            self.elapsed += dt
            tps = n_tok / dt
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                self.log({"type": "train", "step": self.step, "loss": round(loss, 6), "lr": lr_at(self.step - 1, tc),
                          "tokens": self.tokens_seen, "tok_per_s": round(tps, 1), "elapsed": round(self.elapsed, 2)})
            if tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.steps):
                last_val = self.validate()
                if last_val is not None:
                    self.log({"type": "val", "step": self.step, "val_loss": round(last_val, 6),
                              "tokens": self.tokens_seen})
            if (tc.save_every and self.step % tc.save_every == 0) or self.step == tc.steps:
                self.save()
            bar.update(1)
            post = {"loss": f"{loss:.3f}", "tok/s": f"{(self.tokens_seen - start_tokens) / max(self.elapsed - start_time, 1e-9):.0f}",
                    "lr": f"{lr_at(self.step - 1, tc):.2e}"}
            if last_val is not None:
                post["val"] = f"{last_val:.3f}"
            bar.set_postfix(post, refresh=False)
        bar.close()
        return {"step": self.step, "tokens": self.tokens_seen, "elapsed": self.elapsed, "val_loss": last_val,
                "tok_per_s": self.tokens_seen / max(self.elapsed, 1e-9)}

