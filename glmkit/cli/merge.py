"""glmkit merge: a LoRA adapter folded into its base's weights -> a plain model folder (then quantizable)."""
from __future__ import annotations

from pathlib import Path

EXAMPLES = """examples:
  glmkit merge --model ~/models/chatglm3-6b --adapter runs/lora/adapter --out ~/models/chatglm3-6b-mine
  glmkit quantize --model ~/models/chatglm3-6b-mine --bits 4 --out ~/models/chatglm3-6b-mine-int4

The adapter is a PEFT LoRA folder (glmkit finetune --method lora, peft, LLaMA-Factory): W + (alpha / r) B A is
written into each adapted weight, so the result needs no adapter and runs at the base's speed. The base is read
in float (merging into INT4/INT8 weights would lose most of the update to rounding): quantize the merged folder
afterwards. A P-tuning v2 adapter cannot be merged: its prefix is keys/values in front of every sequence, not a
change of any weight; use it with --adapter."""


def add_arguments(p):
    p.add_argument("--model", "-m", required=True, metavar="NAME|DIR", help="the float base model folder (or store name)")
    p.add_argument("--adapter", required=True, metavar="NAME|DIR",
                   help="the LoRA adapter folder (PEFT format), or a name of the model store")
    p.add_argument("--out", "-o", required=True, metavar="NAME|DIR2",
                   help="folder to write (created); a bare NAME (no slash) goes into the model store")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (default: the base checkpoint's)")


def run(args) -> int:
    import torch

    from ..adapters import AdapterError, adapter_kind
    from ..adapters.lora import merge_lora
    from ..adapters.peft_format import load_peft_lora
    from ..checkpoint import load_model, save_model
    from ..store import out_path, resolve

    src, out = Path(resolve(args.model)).expanduser(), out_path(args.out)
    args.adapter = resolve(args.adapter, "adapter")
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError("--out must be a different folder than --model")
    if adapter_kind(args.adapter) == "ptuning":
        raise AdapterError(f"{args.adapter} is a P-tuning v2 adapter: it cannot be merged into the weights (its "
                           "prefix keys/values are not a change of any weight); use it as --adapter instead")
    model, info = load_model(src, dtype=torch.float32)
    if model.config.quantization:
        raise AdapterError(f"{src} is quantized: merge into the float base, then run glmkit quantize on the result")
    load_peft_lora(model, Path(args.adapter).expanduser(), info.layout)
    merge_lora(model)
    name = args.dtype or model.config.torch_dtype or "float32"
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    save_model(model.to(dtype), out, source_dir=src)
    print(f"wrote {out}: {src.name} with {Path(args.adapter).name} merged ({dtype})")
    return 0
