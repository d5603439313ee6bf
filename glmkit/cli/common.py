"""Options shared by the commands that load a model and generate."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", metavar="NAME|DIR",
                   help="a model of the store (glmkit models; $GLMKIT_MODELS) or a model folder (default: the "
                        "embedded glm-tiny toy model): an official download (THUDM/chatglm3-6b, chatglm2-6b, "
                        "chatglm-6b, glm-4-9b-chat[-hf]) or one written by glmkit")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: float32 on CPU for models under 1B parameters, "
                        "else bfloat16; float16 on CUDA/MPS)")
    g.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="context window in tokens to allocate (default 8192, at most the model's)")
    g.add_argument("--quantize", "-q", default=None, metavar="int4|int8",
                   help="quantize the weights while loading (int4, int8, int4:g64 for groups of 64): "
                        "a 6B model in ~3.5 GB (int4) or ~6.5 GB (int8); `glmkit quantize` saves the result")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for PyTorch and the quantized kernels (default: all cores)")
    g.add_argument("--adapter", metavar="NAME|DIR", default=None, action="append",
                   help="a fine-tuned adapter for this base (a name of the store, or a folder): a PEFT LoRA folder "
                        "or an official P-tuning v2 folder "
                        "(as glmkit finetune, peft, LLaMA-Factory or the official scripts write them); serve also "
                        "takes several LoRAs as NAME=DIR, each answering requests for model NAME")
    g.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel degree: split the model over N processes, each loading only its slices "
                        "(run as torchrun --nproc_per_node N -m glmkit ... --tp N; gloo on CPU, NCCL on CUDA; "
                        "rank 0 does the talking)")
    g.add_argument("--cache-mb", type=float, default=None, metavar="MB",
                   help="memory for the prefix cache: keys/values of earlier prompts (chat history, shared "
                        "system prompts) reused by later ones, least recently used dropped first (default "
                        "1024; 0 = off)")


def add_sampling_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling (defaults: the official chat() settings of the model's generation)")
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--max-new-tokens", "-n", type=int, default=None, help="default: until the answer ends")
    g.add_argument("--seed", type=int, default=None, help="same seed, same output")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable); it is not printed")
    g.add_argument("--verbose", "-v", action="store_true",
                   help="after each answer print prompt tokens, time to first token and tokens/s")


def sampling_kwargs(args) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                seed=args.seed, stop=args.stop)


NAMED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.:-]*)=(.+)$")


def split_adapters(values, named_ok: bool = False) -> tuple[Optional[str], dict]:
    """--adapter values -> (the one unnamed adapter folder or None, {name: folder} of the named ones); names
    of the model store resolve to their folders."""
    from ..store import resolve

    plain, named = [], {}
    for v in values or []:
        m = NAMED.match(v)
        if m and not Path(v).expanduser().exists():
            if m.group(1) in named:
                raise ValueError(f"--adapter {m.group(1)}= is given twice")
            named[m.group(1)] = resolve(m.group(2), "adapter")
        else:
            plain.append(resolve(v, "adapter"))
    if len(plain) > 1 or (named and not named_ok):
        raise ValueError("only one --adapter DIR here (glmkit serve takes several LoRAs as NAME=DIR)")
    if plain and named:
        raise ValueError("give either one --adapter DIR (the served model) or named ones NAME=DIR beside the base")
    return (plain[0] if plain else None), named


def load_pipeline(args, named_adapters: bool = False):
    """-> Pipeline (the embedded glm-tiny when no model is given, or the guidance text if it is missing).
    A bare --model NAME of the model store is read from there (args.model becomes its folder)."""
    from ..pipeline import NO_MODEL_HELP, load
    from ..store import resolve

    args.model = resolve(args.model)
    set_threads(args.threads)
    if not args.model:
        from ..models import DEFAULT_MODEL, embedded_model_path
        path = embedded_model_path()
        if path is None:
            print(NO_MODEL_HELP, file=sys.stderr)
            raise SystemExit(2)
        print(f"glmkit: no --model given: using the embedded {DEFAULT_MODEL} (a 7.3M-parameter toy GLM trained "
              "by glmkit on Chinese poetry and English text). For real answers run a THUDM model: "
              "--model ~/models/chatglm3-6b (see --help).", file=sys.stderr)
        args.model = str(path)
    adapter, named = split_adapters(getattr(args, "adapter", None), named_adapters)
    tp = getattr(args, "tp", 1) or 1
    if tp > 1:
        return _tensor_parallel_pipeline(args, tp, adapter or (named or None))
    return load(args.model, dtype=args.dtype, device=args.device, ctx=args.ctx, progress=sys.stderr.isatty(),
                quantize=getattr(args, "quantize", None), cache_mb=getattr(args, "cache_mb", None),
                adapter=adapter)


def _tensor_parallel_pipeline(args, tp: int, adapter):
    """--tp N under torchrun: every rank loads its slices; rank 0 returns the Pipeline (it owns the prompt and
    HTTP), the other ranks follow its model calls until it exits, then exit themselves."""
    import os

    from ..parallel import dist
    from ..pipeline import load

    if int(os.environ.get("WORLD_SIZE", "1")) != tp:
        raise ValueError(f"--tp {tp} runs under torchrun --nproc_per_node {tp} (this process is one of "
                         f"{os.environ.get('WORLD_SIZE', '1')})")
    if adapter:
        raise ValueError("--adapter is not supported with --tp (merge a LoRA into the model first: glmkit merge)")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    d = dist.init_distributed(args.device, timeout_s=7 * 24 * 3600.0)  # followers wait for requests
    pipe = load(args.model, dtype=args.dtype, device=args.device, ctx=args.ctx,
                progress=sys.stderr.isatty() and d.main, quantize=getattr(args, "quantize", None), cache_mb=0, tp=tp)
    if not d.main:
        from ..parallel.runtime import follow
        follow(pipe.model)
        raise SystemExit(0)
    if getattr(args, "cache_mb", None):
        print("glmkit: --tp: the prefix cache is off (--cache-mb ignored)", file=sys.stderr)
    args.cache_mb = 0
    return pipe


def set_threads(n):
    """--threads: PyTorch's intra-op pool and the quantized kernels' pool."""
    import torch

    if not n:
        return
    torch.set_num_threads(n)
    try:
        from .. import kernels
        if kernels.available():
            kernels.set_num_threads(n)
    except (ImportError, AttributeError):
        pass


def stats_line(st, dropped: int = 0) -> str:
    s = (f"[prompt {st.prompt_tokens} tok"
         + (f" ({st.reused_tokens} cached)" if st.reused_tokens else "")
         + f" | answer {st.new_tokens} tok | first token {st.ttft * 1000:.0f} ms"
         + f" | {st.decode_tps:.1f} tok/s | {st.finish_reason}")
    if dropped:
        s += f" | {dropped} oldest messages dropped to fit the context"
    return s + "]"
