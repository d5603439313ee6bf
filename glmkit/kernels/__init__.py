"""Fast CPU kernels for linear layers: weight-only quantized (INT4 / INT8 block formats) and 16-bit float
(fp16 / bf16) weights, fp32 activations.

The C extension ``glmkit.kernels._qgemm`` (built by setup.py, optional) is imported lazily; when it is missing,
failed to build, or the CPU lacks AVX2/FMA/F16C, ``available()`` is False and ``reason()`` says why, and callers
use their pure PyTorch path. Setting GLMKIT_NO_KERNELS=1 in the environment disables it too.

Weights come in the canonical format of glmkit/quant.py (W [N, K], K % group == 0, group % 32 == 0):
  kind 8 ("q8"): qweight int8 [N, K],       scales float16 [N, K // group];  w = q * s
  kind 4 ("q4"): qweight uint8 [N, K // 2], scales float16 [N, K // group];  w = (u - 8) * s, ggml Q4_0 nibbles
``pack`` turns them into the kernel layout (one flat uint8 tensor, documented in qgemm.c: 8-row panels,
quant area then fp16 scale area, packed_nbytes(kind, N, K, group) bytes = the canonical size when N % 8 == 0);
``gemm`` computes y = x @ W^T + bias in fp32 with activations quantized to int8 per 32-block.

Float kinds (weights used unquantized, as the checkpoint stores them; fgemm.c):
  kind 16 ("f16"): W float16 [N, K]      kind 17 ("bf16"): W bfloat16 [N, K]
``pack_float`` lays them out in 16-row panels (packed_nbytes(kind, N, K) bytes: the weight's own size when
N % 16 == 0); ``gemm`` converts them to fp32 in registers (F16C / a shift) and accumulates in fp32: for decode
straight from the weight stream, for prefill over converted 256-k tiles with a register-blocked fp32 kernel.
The group argument of packed_nbytes / gemm means nothing for float kinds (pass 0).

Variants (``cpu_features()['isa']``): 'avx512' (AVX-512 F/BW/VL + VNNI, where the CPU and the OS have them),
'avx2' (AVX2 + FMA + F16C), 'scalar' (portable C). The best one runs unless GLMKIT_KERNEL_ISA=avx2|scalar
caps it (or ``set_isa``); all give the reference results up to fp32 summation order.

This module imports nothing from the rest of glmkit (only torch).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["available", "reason", "pack", "pack_float", "gemm", "packed_nbytes", "set_num_threads",
           "get_num_threads", "set_spin_us", "cpu_features", "set_isa", "isa", "stream_read", "KernelError",
           "F16", "BF16", "FLOAT_KINDS"]

F16, BF16 = 16, 17
FLOAT_KINDS = {torch.float16: F16, torch.bfloat16: BF16}
_KIND = {4: 4, 8: 8, "q4": 4, "q8": 8, "int4": 4, "int8": 8, 16: F16, "f16": F16, "fp16": F16, "float16": F16,
         17: BF16, "bf16": BF16, "bfloat16": BF16}
ISAS = ("avx512", "avx2", "scalar")

_ext = None          # the extension module once loaded
_state = None        # None: not tried yet; else (ok: bool, reason: str)


class KernelError(ValueError):
    pass


def _load():
    global _ext, _state
    if _state is not None:
        return _ext
    if os.environ.get("GLMKIT_NO_KERNELS", "") not in ("", "0"):
        _state = (False, "disabled by GLMKIT_NO_KERNELS")
        return None
    try:
        from . import _qgemm  # noqa: PLC0415
    except ImportError as e:
        _state = (False, f"C extension glmkit.kernels._qgemm not built or not importable ({e}); "
                         "reinstall glmkit with a C compiler (pip install -e .)")
        return None
    f = _qgemm.cpu_features()
    if f.get("isa_env_error"):
        _state = (False, f["isa_env_error"])
        _ext = _qgemm
        return None
    if f["isa_best"] == "scalar":
        missing = [k for k in ("avx2", "fma", "f16c") if not f.get(k)]
        _state = (False, "CPU lacks " + "/".join(m.upper() for m in missing or ["AVX2"]) +
                  " (the kernels need x86-64 with AVX2, FMA and F16C)")
        _ext = _qgemm            # still reachable for tests (portable scalar path) via _extension()
        return None
    _ext = _qgemm
    _state = (True, "ok")
    return _ext


def available() -> bool:
    """True when the fast kernels can run on this machine."""
    _load()
    return _state[0]


def reason() -> str:
    """Why the kernels are unavailable ('ok' when they are)."""
    _load()
    return _state[1]


def _extension():
    """The raw extension module (also when the CPU lacks AVX2: its scalar path); raises if it is missing."""
    _load()
    if _ext is None:
        raise KernelError(reason())
    return _ext


def _need():
    if _ext is None or not _state[0]:
        if _load() is None:
            raise KernelError(f"glmkit kernels unavailable: {reason()}")
    return _ext


def _kind(kind) -> int:
    k = _KIND.get(kind)
    if k is None:
        raise KernelError(f"kind must be 4/'q4'/'int4', 8/'q8'/'int8', 16/'f16' or 17/'bf16', not {kind!r}")
    return k


def _check_shape(N: int, K: int, group: int, k: int = 4):
    if k in (F16, BF16):
        if N < 1 or K < 1:
            raise KernelError(f"bad shape N={N} K={K}: need N >= 1 and K >= 1")
        return
    if N < 1 or K < 32 or group < 32 or group % 32 or K % group:
        raise KernelError(f"bad shape N={N} K={K} group={group}: need N >= 1, group a multiple of 32, "
                          "K a multiple of group")


def packed_nbytes(kind, N: int, K: int, group: int = 0) -> int:
    """Bytes of the packed layout of an N x K weight (rows padded to a multiple of 8; 16 for float kinds)."""
    k = _kind(kind)
    _check_shape(N, K, group, k)
    if k in (F16, BF16):
        return (N + 15) // 16 * 16 * K * 2
    P8 = (N + 7) // 8 * 8
    return P8 * (K // 2 if k == 4 else K) + P8 * (K // group) * 2


def _scales_offset(k: int, N: int, K: int) -> int:
    if k in (F16, BF16):
        return (N + 15) // 16 * 16 * K * 2          # no scale area: its offset is the end
    return (N + 7) // 8 * 8 * (K // 2 if k == 4 else K)


def pack(kind, qweight: torch.Tensor, scales: torch.Tensor, group: int,
         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Canonical (qweight, scales) -> the kernel's packed layout: a flat uint8 CPU tensor of
    packed_nbytes(kind, N, K, group) bytes (written into `out` when given: uint8, contiguous, that many bytes).
    """
    ext = _need()
    k = _kind(kind)
    if qweight.device.type != "cpu" or scales.device.type != "cpu":
        raise KernelError("pack: qweight and scales must be CPU tensors")
    if qweight.dim() != 2 or scales.dim() != 2:
        raise KernelError(f"pack: qweight and scales must be 2-D, got {tuple(qweight.shape)}, {tuple(scales.shape)}")
    want = torch.uint8 if k == 4 else torch.int8
    if qweight.dtype != want:
        raise KernelError(f"pack: int{k} qweight must be {want}, not {qweight.dtype}")
    if scales.dtype != torch.float16:
        raise KernelError(f"pack: scales must be float16, not {scales.dtype}")
    N = qweight.shape[0]
    K = qweight.shape[1] * (2 if k == 4 else 1)
    _check_shape(N, K, group)
    if tuple(scales.shape) != (N, K // group):
        raise KernelError(f"pack: scales of shape {tuple(scales.shape)}, expected {(N, K // group)} "
                          f"for a {N}x{K} weight with group {group}")
    qweight = qweight.contiguous()
    scales = scales.contiguous()
    nbytes = packed_nbytes(k, N, K, group)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8)
    elif (out.dtype != torch.uint8 or not out.is_contiguous() or out.device.type != "cpu"
          or out.numel() != nbytes):
        raise KernelError(f"pack: out must be a contiguous CPU uint8 tensor of {nbytes} bytes")
    ext.repack(k, qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), N, K, group)
    return out


def pack_float(weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A float16 / bfloat16 weight [N, K] -> the float kernels' layout (16-row panels, see fgemm.c): a flat uint8
    CPU tensor of packed_nbytes(kind, N, K) bytes, kind = FLOAT_KINDS[weight.dtype] (into `out` when given)."""
    ext = _need()
    k = FLOAT_KINDS.get(weight.dtype)
    if k is None:
        raise KernelError(f"pack_float: weight must be float16 or bfloat16, not {weight.dtype}")
    if weight.device.type != "cpu" or weight.dim() != 2:
        raise KernelError(f"pack_float: weight must be a 2-D CPU tensor, got {tuple(weight.shape)} on {weight.device}")
    N, K = weight.shape
    _check_shape(N, K, 0, k)
    weight = weight.contiguous()
    nbytes = packed_nbytes(k, N, K)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8)
    elif (out.dtype != torch.uint8 or not out.is_contiguous() or out.device.type != "cpu"
          or out.numel() != nbytes):
        raise KernelError(f"pack_float: out must be a contiguous CPU uint8 tensor of {nbytes} bytes")
    ext.repack(k, weight.data_ptr(), 0, out.data_ptr(), N, K, 0)
    return out


def unpack_float(kind, packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The inverse of pack_float() in plain torch: packed bytes -> the weight [N, K] (float16 / bfloat16)."""
    k = _kind(kind)
    if k not in (F16, BF16):
        raise KernelError(f"unpack_float: kind {kind!r} is not a float kind")
    nbytes = packed_nbytes(k, N, K)
    if packed.dtype != torch.uint8 or packed.numel() != nbytes:
        raise KernelError(f"unpack_float: expected {nbytes} packed uint8 bytes, got {packed.dtype} {packed.numel()}")
    P = (N + 15) // 16
    w = packed.view(torch.float16 if k == F16 else torch.bfloat16).view(P, K, 16)
    return w.permute(0, 2, 1).reshape(P * 16, K)[:N].contiguous()


def unpack(kind, packed: torch.Tensor, N: int, K: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack(): packed bytes -> canonical (qweight, scales), in plain torch (no extension needed).
    For saving a model whose canonical copy was dropped after packing; not on any hot path."""
    k = _kind(kind)
    if k in (F16, BF16):
        raise KernelError("unpack: float kinds have no (qweight, scales); use unpack_float")
    _check_shape(N, K, group)
    nbytes = packed_nbytes(k, N, K, group)
    if packed.dtype != torch.uint8 or packed.numel() != nbytes:
        raise KernelError(f"unpack: expected {nbytes} packed uint8 bytes, got {packed.dtype} {packed.numel()}")
    P, NB, NG = (N + 7) // 8, K // 32, K // group
    soff = _scales_offset(k, N, K)
    chunks = 4 if k == 4 else 8
    # quant area [P, NB, chunk j, row r, byte i] -> row-major [P, r, NB, j, i] (see the layout in qgemm.c)
    q = packed[:soff].view(P, NB, chunks, 8, 4).permute(0, 3, 1, 2, 4).reshape(P * 8, -1)[:N]
    q = q.contiguous() if k == 4 else q.contiguous().view(torch.int8)
    sc = packed[soff:].view(torch.float16).view(P, NG, 8).permute(0, 2, 1).reshape(P * 8, NG)[:N].contiguous()
    return q, sc


_LAYOUT: dict = {}     # (kind, N, K, group) -> (packed bytes, scale-area offset)


def _layout(k: int, N: int, K: int, group: int):
    key = (k, N, K, group)
    v = _LAYOUT.get(key)
    if v is None:
        v = _LAYOUT[key] = (packed_nbytes(k, N, K, group), _scales_offset(k, N, K))
    return v


def gemm(kind, x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], N: int, K: int, group: int,
         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] (fp32, contiguous, CPU) @ W^T + bias (fp32 [N] or None); W = pack(...) output.

    Meant for small M (decode, M <= ~16); any M works. `out`, when given, must be a contiguous fp32 [M, N].
    """
    ext = _ext if (_state is not None and _state[0]) else _need()
    k = _KIND.get(kind) or _kind(kind)
    nbytes, soff = _layout(k, N, K, group)
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != K or x.is_cuda or not x.is_contiguous():
        raise KernelError(f"gemm: x must be a contiguous CPU float32 [M, {K}] tensor, got {x.dtype} "
                          f"{tuple(x.shape)} on {x.device}" + ("" if x.is_contiguous() else " (not contiguous)"))
    if packed.dtype != torch.uint8 or packed.numel() != nbytes or packed.is_cuda or not packed.is_contiguous():
        what = {F16: "fp16", BF16: "bf16"}.get(k, f"int{k}")
        raise KernelError(f"gemm: packed must be the contiguous uint8 CPU tensor from pack() for a {N}x{K} "
                          f"{what} weight with group {group} ({nbytes} bytes), got {packed.dtype} with "
                          f"{packed.numel()} elements")
    bp = 0
    if bias is not None:
        if bias.dtype != torch.float32 or bias.numel() != N or bias.is_cuda or not bias.is_contiguous():
            raise KernelError(f"gemm: bias must be a contiguous CPU float32 tensor of {N} elements")
        bp = bias.data_ptr()
    M = x.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=torch.float32)
    elif out.dtype != torch.float32 or out.shape != (M, N) or out.is_cuda or not out.is_contiguous():
        raise KernelError(f"gemm: out must be a contiguous CPU float32 [{M}, {N}] tensor")
    if M:
        p = packed.data_ptr()
        ext.gemm(k, x.data_ptr(), p, p + soff, bp, out.data_ptr(), M, N, K, group)
    return out


def set_num_threads(n: int) -> None:
    """Threads the kernels use (the calling thread included); n < 1: all online CPUs (the default)."""
    _extension().set_num_threads(int(n))


def get_num_threads() -> int:
    return _extension().get_num_threads()


def set_spin_us(us: float) -> None:
    """How long idle pool workers spin (microseconds) before sleeping; default 50 (env GLMKIT_QGEMM_SPIN_US)."""
    _extension().set_spin_us(float(us))


def cpu_features() -> dict:
    """What the CPU and OS offer and which kernel variant runs (empty when the extension is not built):
    {'x86_64', 'avx2', 'fma', 'f16c', 'avx512f', 'avx512bw', 'avx512vl', 'avx512vnni', 'avx512bf16', 'avx512fp16',
    'os_ymm', 'os_zmm': bool (os_*: the OS saves those registers, from xgetbv), 'isa': the variant in use,
    'isa_best': the best this machine runs, 'isa_cap': that capped by GLMKIT_KERNEL_ISA, 'impl': 'avx2' when the
    non-GEMM decode ops use their AVX2 code (any isa but 'scalar') else 'scalar'}."""
    try:
        return dict(_extension().cpu_features())
    except KernelError:
        return {}


def isa() -> str:
    """The kernel variant in use: 'avx512', 'avx2' or 'scalar' ('' when the extension is not built)."""
    return cpu_features().get("isa", "")


def set_isa(name: str) -> None:
    """Run a given variant: 'avx512', 'avx2', 'scalar', or 'auto' (the best one, capped by GLMKIT_KERNEL_ISA).
    'avx512-emulated' (tests) runs the AVX-512 code paths with their AVX-512-only instructions emulated on AVX2.
    A variant this CPU cannot run is an error."""
    try:
        _extension().set_impl(str(name))
    except (ValueError, RuntimeError) as e:
        raise KernelError(f"set_isa({name!r}): {e}") from None


def stream_read(buf: torch.Tensor, nthreads: int = 0) -> float:
    """Seconds for the pool's threads to read the whole (contiguous CPU) tensor once: memory-bandwidth probe."""
    if not buf.is_contiguous() or buf.is_cuda:
        raise KernelError("stream_read: need a contiguous CPU tensor")
    return _extension().stream_read(buf.data_ptr(), buf.numel() * buf.element_size(), int(nthreads))[0]
