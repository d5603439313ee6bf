"""glmkit finetune: LoRA (also on a frozen INT8/INT4 base), P-tuning v2 and full fine-tuning on chat data, through
the same training loop as pretraining (loop.py: warmup + cosine, gradient accumulation, atomic checkpoints with
exact resume, torchrun DDP, skipped non-finite steps).

    data (finetune_data.py: four formats -> the base's own chat format, loss on assistant turns)
      -> ExampleBatcher (a seeded order per epoch, --mix general data interleaved at --mix-ratio)
      -> Tuned (the base with its adapter: LoRA modules inside it, or P-tuning's prefix encoder beside it)
      -> loop.Trainer -> OUT/adapter (PEFT LoRA or official P-tuning folder) or OUT/model (full)

What is saved loads back in the tools people use: a LoRA as PEFT writes it on the official modeling code (or on
transformers' GlmForCausalLM), a P-tuning prefix as the official ptuning scripts write it; glmkit.load(base,
adapter=OUT/adapter) and `--adapter` read both.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .blank_infilling import IGNORE


# --- the trained module -----------------------------------------------------------------------------------

class Tuned(nn.Module):
    """A GLM and its adapter as one module for the training loop: LoRA lives inside the GLM's layers, P-tuning's
    prefix encoder beside it (its keys/values, with the official dropout 0.1 in training, in front of every
    row). forward(input_ids[, position_ids, attention_mask, targets]) -> logits (or the summed loss: GLM.lm_loss)."""

    def __init__(self, glm: nn.Module, prefix_encoder: Optional[nn.Module] = None, prefix_dropout: float = 0.1):
        super().__init__()
        self.glm, self.prefix_encoder, self.prefix_dropout = glm, prefix_encoder, prefix_dropout

    @property
    def config(self):
        return self.glm.config

    def forward(self, input_ids: torch.Tensor, position_ids=None, attention_mask=None, targets=None) -> torch.Tensor:
        if self.prefix_encoder is None:
            return self.glm(input_ids, position_ids=position_ids, attention_mask=attention_mask, targets=targets)
        B, T = input_ids.shape
        kv = self.prefix_encoder.prefix_kv(B, dropout=self.prefix_dropout)
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
        return self.glm(input_ids, kv, cache_pos=pos, kv_len=T, position_ids=position_ids,
                        attention_mask=attention_mask, targets=targets)


# --- batches of examples ----------------------------------------------------------------------------------

class ExampleBatcher:
    """Rows are examples (input_ids, labels with IGNORE off the trained tokens), one per row, padded to the
    longest of their micro-batch. The order is a seeded permutation per epoch, the cursor (epoch, index) is the
    whole data position (saved in checkpoints); with `mix` examples and ratio r, each row is drawn from `mix`
    with probability r (a seeded coin per row, so resume and every rank see the same rows)."""

    def __init__(self, examples: Sequence, seed: int = 0, shuffle: bool = True, mix: Sequence = (),
                 mix_ratio: float = 0.0):
        if not examples:
            raise ValueError("no training examples")
        if mix_ratio and not mix:
            raise ValueError("--mix-ratio needs --mix data")
        if not 0 <= mix_ratio < 1:
            raise ValueError(f"--mix-ratio must be in [0, 1), got {mix_ratio}")
        self.examples, self.mix, self.mix_ratio = list(examples), list(mix), mix_ratio
        self.seed, self.shuffle = seed, shuffle
        self.pos = {"main": [0, 0], "mix": [0, 0]}              # stream -> [epoch, index]
        self.rows_drawn = 0

    def state(self) -> dict:
        return {"pos": {k: list(v) for k, v in self.pos.items()}, "rows": self.rows_drawn}

    def load_state(self, st: dict):
        self.pos = {k: list(v) for k, v in st["pos"].items()}
        self.rows_drawn = int(st["rows"])

    def _take(self, stream: str):
        data = self.examples if stream == "main" else self.mix
        epoch, index = self.pos[stream]
        if index >= len(data):
            epoch, index = epoch + 1, 0
        order = (np.random.default_rng([self.seed, epoch, stream == "mix"]).permutation(len(data))
                 if self.shuffle else np.arange(len(data)))
        self.pos[stream] = [epoch, index + 1]
        return data[int(order[index])]

    def next_rows(self, n: int) -> list:
        rows = []
        for _ in range(n):
            coin = np.random.default_rng([self.seed, 7, self.rows_drawn]).random() if self.mix_ratio else 1.0
            rows.append(self._take("mix" if coin < self.mix_ratio else "main"))
            self.rows_drawn += 1
        return rows

    @property
    def epoch(self) -> float:
        e, i = self.pos["main"]
        return e + i / len(self.examples)

    @staticmethod
    def collate(rows: list, pad_id: int) -> dict:
        """-> input_ids [B, T] (right-padded with pad_id), targets [B, T]: targets[t] is the label of t + 1."""
        T = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), T), pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        for r, (ids, labels) in enumerate(rows):
            x[r, :len(ids)] = torch.tensor(ids)
            y[r, :len(ids) - 1] = torch.tensor(labels[1:])
        return {"input_ids": x, "targets": y}

    @staticmethod
    def count(rows: list) -> tuple[int, int]:
        return sum(sum(1 for t in labels[1:] if t != IGNORE) for _, labels in rows), sum(len(i) for i, _ in rows)


# --- the run ------------------------------------------------------------------------------------------------

METHOD_LR = {"lora": 1e-4, "ptuning": 2e-2, "full": 1e-5}      # the official scripts' / LLaMA-Factory's usual
METHOD_NAMES = ("lora", "ptuning", "full")


def _warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _read_data(args, paths, on_error=_warn):
    from .finetune_data import Summary, read_examples
    summary = Summary()
    examples = read_examples(paths, args.data_format, args.prompt_column, args.response_column,
                             args.history_column, on_error, dict(kv.split("=", 1) for kv in (args.replace or [])),
                             summary)
    return examples, summary


def _encode(args, tok, examples, summary, on_error=_warn):
    from .finetune_data import encode_examples
    return encode_examples(tok, examples, args.max_source_length, args.max_target_length, on_error,
                           each_turn=args.each_turn, summary=summary)


def _load_base(args):
    """-> (model, LoadInfo, tokenizer). INT8/INT4 with --quantize (the base stays quantized and frozen)."""
    from ..checkpoint import load_model
    from ..tokenizer import load_tokenizer
    model, info = load_model(Path(args.model).expanduser(), dtype=torch.float32, quantize=args.quantize,
                             progress=sys.stderr.isatty() and not args.quiet)
    if model.config.quantization and args.method == "full":
        raise ValueError(f"{args.model}: full fine-tuning needs the float model, not a quantized one "
                         "(use --method lora or ptuning on a quantized base)")
    tok = load_tokenizer(Path(args.model).expanduser(), model.config.family)
    return model, info, tok


def _adapt(args, model, info):
    """Put the method's trainable part on the model -> (the module the loop trains, the prefix encoder or None)."""
    model.requires_grad_(False)
    enc = None
    if args.method == "lora":
        from ..adapters.lora import apply_lora
        apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets,
                   layout=info.layout if info.layout != "glmkit" else None, seed=args.seed)
    elif args.method == "ptuning":
        from ..adapters.ptuning import PrefixEncoder
        enc = PrefixEncoder(model.config, args.pre_seq_len, args.prefix_projection)
        enc.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        if args.freeze_layers:                          # train only the last N blocks (and the head)
            n = model.config.num_layers - args.freeze_layers
            if n < 1:
                raise ValueError(f"--freeze-layers {args.freeze_layers} leaves nothing to train in "
                                 f"{model.config.num_layers} layers")
            for p in list(model.tok_embeddings.parameters()) + [q for lay in model.layers[:args.freeze_layers]
                                                                 for q in lay.parameters()]:
                p.requires_grad_(False)
    model.grad_checkpointing = args.grad_checkpointing
    return Tuned(model, enc), enc


def _exporter(args, model, info, enc, out: Path):
    """What a checkpoint also writes: OUT/adapter (PEFT LoRA, official P-tuning folder) or OUT/model (full)."""
    base = Path(args.model).expanduser()

    def export(_module):
        if args.method == "lora":
            from ..adapters.peft_format import save_peft_lora
            save_peft_lora(model, out / "adapter", None if info.layout == "glmkit" else info.layout,
                           base_name=str(base))
        elif args.method == "ptuning":
            from ..adapters.ptuning import save_ptuning
            conf = base / "config.json"
            save_ptuning(enc, out / "adapter", json.loads(conf.read_text(encoding="utf-8")) if conf.is_file() else {})
        else:
            from ..checkpoint import save_model
            save_model(model, out / "model", source_dir=base)
    return export


def run(args) -> dict:
    from .loop import Trainer, TrainConfig, init_distributed

    if args.method not in METHOD_NAMES:
        raise ValueError(f"--method must be one of {', '.join(METHOD_NAMES)}, not {args.method!r}")
    dist_info = init_distributed(args.device)
    out = Path(args.out).expanduser()
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file() and not args.resume:
        raise ValueError(f"{out} already holds a run (checkpoint.pt): add --resume to continue it, or choose another "
                         "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if dist_info.main and not args.quiet else (lambda m: None)
    # the data first: a dataset with nothing usable stops here, before any model is read
    examples, summary = _read_data(args, args.data)
    mix_examples, mix_summary = _read_data(args, args.mix) if args.mix else ([], None)
    eval_examples, eval_summary = _read_data(args, args.eval_data) if args.eval_data else ([], None)
    model, info, tok = _load_base(args)
    torch.manual_seed(args.seed)                         # adapter init and dropout masks: the same run every time
    rows, summary = _encode(args, tok, examples, summary)
    mix_rows = _encode(args, tok, mix_examples, mix_summary)[0] if mix_examples else []
    val_rows = _encode(args, tok, eval_examples, eval_summary)[0] if eval_examples else []
    say(summary.line())
    if mix_rows:
        say(f"mixed in: {len(mix_rows)} examples from {', '.join(map(str, args.mix))} at ratio {args.mix_ratio}")
    module, enc = _adapt(args, model, info)
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    batcher = ExampleBatcher(rows, seed=args.seed, mix=mix_rows, mix_ratio=args.mix_ratio)
    per_step = args.batch_size * args.grad_accum * dist_info.world       # examples per optimizer step, all ranks
    steps = args.steps or max(1, math.ceil(args.epochs * len(rows) / per_step))
    tc = TrainConfig(steps=steps, seq_len=0, rows=per_step, micro_rows=args.batch_size,
                     lr=args.lr or METHOD_LR[args.method], min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
                     weight_decay=args.weight_decay, grad_clip=args.grad_clip, dtype=args.dtype,
                     eval_every=args.eval_every if val_rows else 0, save_every=args.save_every, seed=args.seed,
                     extra={"method": args.method})
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps({
            "argv": sys.argv, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "examples": len(rows), "mix_examples": len(mix_rows), "eval_examples": len(val_rows),
            "trainable_parameters": n_train, "steps": steps, "base_layout": info.layout,
        }, indent=2, ensure_ascii=False, default=str))
    say(f"{args.method}: {n_train / 1e6:.3f}M trainable parameters of {model.config.num_params() / 1e6:.1f}M"
        f"{' (base ' + 'int%d' % model.config.quantization['bits'] + ', frozen)' if model.config.quantization else ''}"
        f"; {steps} steps x {per_step} examples ({args.batch_size} per forward on {dist_info.world} "
        f"process(es)), lr {tc.lr:g}")
    trainer = Trainer(module, tc, batcher, val_rows, out, device=args.device, dist_info=dist_info,
                      pad_id=tok.pad_id if tok.pad_id is not None else 0,
                      export=_exporter(args, model, info, enc, out), progress=not args.quiet,
                      save_trainable=args.method != "full")
    if ckpt.is_file() and args.resume:
        ck = trainer.load()
        say(f"resumed {out} at step {ck['step']}")
    res = trainer.run()
    what = out / ("model" if args.method == "full" else "adapter")
    say(f"done: step {res['step']}, {res['tokens']} tokens, {res['tok_per_s']:.0f} tokens/s"
        + (f", eval loss {res['val_loss']:.4f}" if res.get("val_loss") is not None else "")
        + f"; {what} (use: glmkit chat --model {args.model}"
        + (f" --adapter {what})" if args.method != "full" else f" -> glmkit chat --model {what})"))
    if dist_info.world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return res
