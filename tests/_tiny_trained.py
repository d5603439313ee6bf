"""A small byte-level GLM (ChatGLM2 architecture) trained for a minute on Shakespeare, for accuracy tests of
quantization until the embedded glm-tiny exists. Cached per process by the tests that use it."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from glmkit.config import ModelConfig
from glmkit.model import GLM

SEQ = 128


def byte_config() -> ModelConfig:
    # ChatGLM2/3 architecture (RMSNorm, grouped QKV, SwiGLU, 1D rotary) at a size where every Linear's input
    # is a multiple of 32, so every layer is quantized; vocab = 256 bytes
    return ModelConfig(family="chatglm2", vocab_size=256, hidden_size=128, num_layers=4, num_heads=4,
                       num_kv_heads=2, head_dim=32, ffn_hidden_size=384, max_seq_len=SEQ,
                       qkv_bias=True)


def split_text(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    n = int(len(data) * 0.9)
    return data[:n], data[n:]


def train(path: Path, steps: int = 300, batch: int = 16, seed: int = 0) -> tuple[GLM, torch.Tensor]:
    torch.manual_seed(seed)
    train_ids, held = split_text(path)
    model = GLM(byte_config()).init_weights(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        lr = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(train_ids) - SEQ - 1, (batch,), generator=g)
        x = torch.stack([train_ids[i:i + SEQ] for i in idx])
        y = torch.stack([train_ids[i + 1:i + SEQ + 1] for i in idx])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model, held


@torch.no_grad()
def perplexity(model: GLM, held: torch.Tensor, n_seq: int = 64) -> float:
    n = min(n_seq, (len(held) - 1) // SEQ)
    x = held[:n * SEQ].view(n, SEQ)
    y = held[1:n * SEQ + 1].view(n, SEQ)
    total = 0.0
    for i in range(0, n, 16):
        logits = model(x[i:i + 16]).float()
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + 16].flatten(), reduction="sum").item()
    return math.exp(total / (n * SEQ))
