"""Fine-tuning adapters on a GLM: LoRA (lora.py: the modules, apply/merge; peft_format.py: PEFT folders in the
official key names of each layout) and P-tuning v2 (ptuning.py: the official prefix encoder and folders).

load_adapter() is what glmkit.load(base, adapter=DIR) and every command's --adapter call: it tells the two
formats apart, puts a LoRA into the model, and returns a P-tuning prefix as the keys/values the engine's KV
cache puts in front of every sequence."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .ptuning import AdapterError, is_ptuning_folder


def adapter_kind(folder) -> str:
    """"lora" (a PEFT folder) or "ptuning" (an official P-tuning v2 folder); AdapterError otherwise."""
    from .peft_format import is_peft_folder
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"--adapter {folder}: no such folder")
    if is_peft_folder(folder):
        return "lora"
    if is_ptuning_folder(folder):
        return "ptuning"
    raise AdapterError(f"--adapter {folder} is neither a PEFT LoRA folder (adapter_config.json + "
                       "adapter_model.safetensors or .bin) nor a P-tuning v2 folder (config.json with pre_seq_len + "
                       "pytorch_model.bin or model.safetensors holding transformer.prefix_encoder.*)")


def load_adapter(model, folder, layout: Optional[str] = None, name: str = "default"):
    """Apply the adapter in `folder` to `model` (LoRA: inside its layers, unmerged) -> the P-tuning prefix
    keys/values [layers, 2, G, P, D] for the engine, or None for a LoRA."""
    kind = adapter_kind(folder)
    if kind == "lora":
        from .peft_format import load_peft_lora
        load_peft_lora(model, Path(folder).expanduser(), layout, name=name)
        return None
    from .ptuning import load_ptuning
    enc = load_ptuning(Path(folder).expanduser(), model.config)
    return enc.kv().detach().to(model.dtype)
