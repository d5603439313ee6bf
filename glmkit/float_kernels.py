"""fp16 / bf16 models on the CPU kernels: nn.Linear and nn.Embedding with 16-bit float weights, unquantized.

A float model loaded for inference on a CPU with the kernels (glmkit/kernels, kinds 16 = fp16 and 17 = bf16) runs
its matrix multiplies there instead of in PyTorch (whose bf16 GEMM on a CPU without bf16 hardware read a
512-token prompt at 1.6 tok/s against llama.cpp F16's 12.3 on our 2-core machine):

  FloatLinear     the weight stays in its dtype (a bf16 checkpoint is bf16 in memory: the same bytes, re-laid out
                  once into 16-row panels by kernels.pack_float, the original dropped), converted to fp32 inside
                  the kernel; activations, products and sums are fp32. Any batch size: decode streams the
                  weights once per step, prefill runs a register-blocked fp32 GEMM over converted tiles.
  FloatEmbedding  the embedding table stays in its dtype; looked-up rows come out in fp32.
  prepare_float   swaps a model's Linear / Embedding modules for these and turns what is left in 16-bit float
                  (norm weights, biases: small) into fp32, so the model computes in fp32 with 16-bit matrices,
                  like a quantized one; engine/fast_decode.py's fused decode step then runs it too.

Like quant.py, this knows torch.nn, not GLM. Inference only: the weights are frozen (gradients still flow to
the input, for P-tuning), and a model with LoRA layers is left as it is (LoRA wraps nn.Linear).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROWS_PER_CALL = 256            # rows of x per kernel call (bounded scratch; a 512-token prompt takes two)


def _kernels():
    from . import kernels
    return kernels if kernels.available() else None


class _FloatLinearGrad(torch.autograd.Function):
    """grad_x = grad_y @ W, W unpacked once per backward (the weight itself gets no gradient)."""

    @staticmethod
    def forward(ctx, x, mod):
        ctx.mod = mod
        with torch.no_grad():
            return mod.forward_frozen(x)

    @staticmethod
    def backward(ctx, gy):
        m = ctx.mod
        gx = gy.reshape(-1, m.out_features).float() @ m.weight.float()
        return gx.view(*gy.shape[:-1], m.in_features).to(gy.dtype), None


class FloatLinear(nn.Module):
    """nn.Linear (inference) whose fp16 / bf16 weight lives in the kernels' packed layout.

    Shares QuantLinear's kernel interface (bits = the kernel kind 16 / 17, group 0, _packed, bias fp32,
    prepare()), so fast_decode.py drives both the same way. state_dict() gives `weight` in its own dtype and
    `bias`, as nn.Linear has them; loading a state dict repacks."""

    supports_autograd = True

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        k = _kernels()
        if k is None:
            from . import kernels
            raise RuntimeError(f"FloatLinear needs the CPU kernels: {kernels.reason()}")
        if weight.dtype not in k.FLOAT_KINDS or weight.dim() != 2:
            raise ValueError(f"FloatLinear takes a 2-D float16 / bfloat16 weight, not {weight.dtype} "
                             f"{tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype
        self.bits = k.FLOAT_KINDS[weight.dtype]          # the kernel kind (QuantLinear's name for it)
        self.group = 0
        self.use_fast = True
        self.register_buffer("packed", k.pack_float(weight.detach().to("cpu")), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to("cpu", torch.float32).clone())

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "FloatLinear":
        return cls(lin.weight, lin.bias)

    @property
    def _packed(self) -> torch.Tensor:                  # QuantLinear's name, read by fast_decode.py
        return self.packed

    def prepare(self) -> bool:
        return self.packed.device.type == "cpu"

    @property
    def weight(self) -> torch.Tensor:
        """The weight [N, K] in its dtype (a fresh tensor unpacked from the kernel layout)."""
        from . import kernels
        return kernels.unpack_float(self.bits, self.packed.cpu(), self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{str(self.weight_dtype).replace('torch.', '')} on the CPU kernels")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias.to(self.weight_dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        from . import kernels
        w = state_dict.get(prefix + "weight")
        if w is None:
            missing_keys.append(prefix + "weight")
            return
        if tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: shape {tuple(w.shape)}, expected "
                              f"{(self.out_features, self.in_features)}")
            return
        self.packed = kernels.pack_float(w.to("cpu", self.weight_dtype))
        b = state_dict.get(prefix + "bias")
        if self.bias is not None:
            if b is None:
                missing_keys.append(prefix + "bias")
            else:
                self.bias = b.detach().to("cpu", torch.float32).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FloatLinearGrad.apply(x, self)
        return self.forward_frozen(x)

    def forward_frozen(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        bias = self.bias if self.bias is None or self.bias.dtype == torch.float32 else self.bias.float()
        if not (self.use_fast and x.device.type == "cpu" and self.packed.device.type == "cpu"):
            return F.linear(x, self.weight.to(x.device, x.dtype), None if bias is None else bias.to(x))
        from . import kernels
        M = x.numel() // K
        x2 = x.reshape(M, K)
        xf = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()
        y = torch.empty((M, N), dtype=torch.float32)
        for r in range(0, M, ROWS_PER_CALL):
            kernels.gemm(self.bits, xf[r:r + ROWS_PER_CALL], self.packed, bias, N, K, 0,
                         out=y[r:r + ROWS_PER_CALL])
        return y.to(x.dtype).view(*x.shape[:-1], N)


class FloatEmbedding(nn.Module):
    """nn.Embedding whose table keeps its 16-bit dtype; the rows looked up come out in `out_dtype` (fp32)."""

    def __init__(self, emb: nn.Embedding, out_dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.weight = emb.weight                       # the same Parameter (tied heads keep pointing at it)
        self.out_dtype = out_dtype

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.weight.dtype} -> {self.out_dtype}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.out_dtype)


def eligible(model: nn.Module) -> Optional[str]:
    """None when prepare_float can run this model, else why not."""
    k = _kernels()
    if k is None:
        from . import kernels
        return f"kernels unavailable: {kernels.reason()}"
    if any(type(m).__name__ == "LoRALinear" for m in model.modules()):
        return "LoRA layers (they wrap nn.Linear)"
    if not any(type(m) is nn.Linear and m.weight.dtype in k.FLOAT_KINDS and m.weight.device.type == "cpu"
               for m in model.modules()):
        return "no fp16 / bf16 Linear layer on the CPU"
    return None


def prepare_float(model: nn.Module) -> int:
    """Swap every CPU nn.Linear with an fp16 / bf16 weight for a FloatLinear (one layer at a time: peak memory
    the model plus one matrix) and every such nn.Embedding for a FloatEmbedding; then the remaining 16-bit float
    parameters (norms, biases) become fp32, the activation dtype. Returns how many Linear layers were swapped
    (0, model untouched, where eligible() says no)."""
    if eligible(model) is not None:
        return 0
    k = _kernels()
    n = 0
    parents = [m for m in model.modules() if m._modules]          # (no reference kept to a layer swapped out)
    for parent in parents:
        for cname in list(parent._modules):
            child = parent._modules[cname]
            if type(child) is nn.Linear and child.weight.dtype in k.FLOAT_KINDS and child.weight.device.type == "cpu":
                with torch.no_grad():
                    parent._modules[cname] = FloatLinear.from_linear(child)
                n += 1
            elif type(child) is nn.Embedding and child.weight.dtype in k.FLOAT_KINDS:
                parent._modules[cname] = FloatEmbedding(child)
            del child
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, FloatEmbedding)}
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and id(p) not in embeddings:
            p.data = p.data.float()
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and b.dtype in (torch.float16, torch.bfloat16):
                mod._buffers[name] = b.float()
    return n


def uses_float_kernels(model: nn.Module) -> bool:
    return any(isinstance(m, FloatLinear) for m in model.modules())
