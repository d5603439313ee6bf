"""`glmkit pretrain`: build (or resume) a GLM, tokenize the data once, train with blank infilling, export.

The model is the ChatGLM-6B architecture (2D rotary, alpha-scaled residual, prefix attention) from the core
at the size of a preset or a config file; the tokenizer is a ChatGLM-6B-style SentencePiece folder (from
`glmkit train-tokenizer` or an official ice_text.model). With --sft the data are instruction pairs, rendered in
the model's chat format (loss on the answer only), and --init names the model to start from.

OUT/ holds: data/ (token cache), checkpoint.pt (resume state), metrics.jsonl, model/ (a glmkit model folder,
rewritten at every checkpoint: `glmkit chat --model OUT/model`), run.json (the arguments).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model, save_model
from ..config import ModelConfig, from_hf
from ..model import GLM
from ..tokenizer import load_tokenizer
from .blank_infilling import ObjectiveConfig, SpecialIds
from .data import Batcher, build_cache, open_cache, sentence_end_ids, split_units
from .loop import Trainer, TrainConfig, flops_per_token, init_distributed

# ChatGLM-6B architecture at small sizes (vocab and special ids come from the tokenizer)
ARCH_PRESETS = {
    # untied input/output embeddings: on a 100-step probe the tied model sat ~0.2 nats higher (6.83 vs 6.61)
    "glm-tiny": dict(hidden_size=256, num_layers=4, num_heads=4, ffn_hidden_size=1024, max_seq_len=1024,
                     tie_word_embeddings=False),
    "glm-test": dict(hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=256, max_seq_len=512),
}


def glm_config(tok, hidden_size: int, num_layers: int, num_heads: int, ffn_hidden_size: int,
               max_seq_len: int, name: str = "", tie_word_embeddings: bool = True) -> ModelConfig:
    """A ChatGLM-6B-architecture config for `tok` (embedding rows = vocab padded to a multiple of 64)."""
    s = tok.special
    vocab = (tok.vocab_size + 63) // 64 * 64
    return ModelConfig(
        family="chatglm", vocab_size=vocab, hidden_size=hidden_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_heads, head_dim=hidden_size // num_heads,
        ffn_hidden_size=ffn_hidden_size, max_seq_len=max_seq_len, norm="layernorm", norm_eps=1e-5,
        activation="gelu_tanh", qkv_layout="per_head", qkv_bias=True, out_bias=True, mlp_bias=True,
        glm_residual=True, prefix_lm=True, rope_2d=True, rope_interleaved=False, rope_fp16_freqs=False,
        tie_word_embeddings=tie_word_embeddings,
        mask_token_id=s["[MASK]"], gmask_token_id=s["[gMASK]"], smask_token_id=s["[sMASK]"],
        sop_token_id=s["<sop>"], eos_token_id=s["<eop>"], pad_token_id=tok.pad_id, torch_dtype="float32",
        name=name)


def model_config(spec: str, tok) -> ModelConfig:
    """--model-config: a preset name, or a JSON file (glmkit's config.json or an official config.json)."""
    if spec in ARCH_PRESETS:
        return glm_config(tok, name=spec, **ARCH_PRESETS[spec])
    p = Path(spec).expanduser()
    if not p.is_file():
        raise ValueError(f"--model-config {spec!r} is neither a preset ({', '.join(ARCH_PRESETS)}) nor a file")
    d = json.loads(p.read_text(encoding="utf-8"))
    if d.get("model_type") == "glmkit":
        return ModelConfig.from_dict(d)
    if d.get("model_type") == "chatglm" or "num_layers" in d and "hidden_size" in d and "vocab_size" in d:
        return from_hf(d)
    arch = {k: d[k] for k in ("hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len") if k in d}
    missing = {"hidden_size", "num_layers", "num_heads"} - set(arch)
    if missing:
        raise ValueError(f"{p}: missing {sorted(missing)}")
    arch.setdefault("ffn_hidden_size", 4 * arch["hidden_size"])
    arch.setdefault("max_seq_len", 1024)
    return glm_config(tok, name=d.get("name", p.stem), tie_word_embeddings=d.get("tie_word_embeddings", True),
                      **arch)


def _warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr)


def write_generation_config(folder: Path, cfg: ModelConfig):
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id, "temperature": 0.8,
         "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}, indent=2))


def run(args) -> dict:
    dist_info = init_distributed(args.device)
    if dist_info.world > 1:
        import torch.distributed as dist
    out = Path(args.out).expanduser()
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif dist_info.world > 1 and args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist_info.world))
    ckpt = out / "checkpoint.pt"
    if args.eval_only and not args.init:
        raise ValueError("--eval-only needs --init DIR (the model to evaluate)")
    if ckpt.is_file() and not args.resume and not args.eval_only:
        raise ValueError(f"{out} already holds a run (checkpoint.pt): add --resume to continue it, "
                         "or choose another --out")

    # tokenizer and model
    init_dir = Path(args.init).expanduser() if args.init else None
    tok_dir = Path(args.tokenizer).expanduser() if args.tokenizer else init_dir
    if tok_dir is None:
        raise ValueError("--tokenizer DIR is needed (a folder with ice_text.model: `glmkit train-tokenizer`)")
    if init_dir is not None:
        model, _ = load_model(init_dir, dtype=torch.float32)
        if model.config.quantization:
            raise ValueError(f"{init_dir} is quantized; full fine-tuning needs the float model")
        model.requires_grad_(True)                     # loaded for inference: parameters come frozen
        cfg = model.config
    tok = load_tokenizer(tok_dir, cfg.family if init_dir is not None else "chatglm")
    if init_dir is None:
        cfg = model_config(args.model_config, tok)
        torch.manual_seed(args.seed)
        model = GLM(cfg).init_weights(seed=args.seed)
    if args.mix and not args.sft:
        raise ValueError("--mix adds plain documents to --sft data; without --sft put them in --data")
    if not cfg.prefix_lm:
        raise ValueError("pretraining with blank infilling needs the ChatGLM-6B (GLM) architecture")
    if args.seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's {cfg.max_seq_len} positions")
    special = SpecialIds.from_tokenizer(tok)
    objective = ObjectiveConfig.parse(args.objective)

    # data (rank 0 tokenizes; the others wait and open the same cache)
    max_unit = args.seq_len if args.sft else objective.max_doc_len(args.seq_len)
    replacements = dict(kv.split("=", 1) for kv in (args.replace or []))
    data_dir = out / ("data-sft" if args.sft else "data")
    if dist_info.main:
        cache = build_cache(args.data, tok, data_dir, max_unit, chat=args.sft, replacements=replacements,
                            on_error=_warn, progress=not args.quiet, exclude=args.exclude or (),
                            mix_paths=args.mix or (), mix_units=args.mix_units,
                            mix_max_unit=objective.max_doc_len(args.seq_len), seed=args.seed)
    if dist_info.world > 1:
        dist.barrier()
    if not dist_info.main:
        cache = open_cache(data_dir)
    if args.val_data:
        val_cache = build_cache(args.val_data, tok, out / "data-val", max_unit, chat=args.sft,
                                replacements=replacements, on_error=_warn, progress=False) \
            if dist_info.main else None
        if dist_info.world > 1:
            dist.barrier()
            val_cache = val_cache or open_cache(out / "data-val")
        train_ids = np.arange(len(cache))
        val_ids = np.arange(len(val_cache))[:args.val_docs or None]
    else:
        val_cache = cache
        train_ids, val_ids = split_units(len(cache), args.val_docs, args.seed)
    ends = sentence_end_ids(tok, args.extra_sentence_ends or "")
    batcher = Batcher(cache, train_ids, args.seq_len, objective, special, ends, args.seed)
    val_rows = Batcher(val_cache, val_ids, args.seq_len, objective, special, ends, args.seed,
                       shuffle=False).all_rows() if len(val_ids) else []

    rows = max(1, args.batch_tokens // args.seq_len)
    tc = TrainConfig(steps=args.steps, seq_len=args.seq_len, rows=rows, micro_rows=args.micro_batch,
                     lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
                     weight_decay=args.weight_decay, grad_clip=args.grad_clip, emb_grad_shrink=args.emb_grad_shrink,
                     fp32_softmax=not args.no_fp32_softmax, dtype=args.dtype, eval_every=args.eval_every,
                     save_every=args.save_every, seed=args.seed)
    export_dir = out / "model"

    export_dtype = getattr(torch, args.export_dtype)

    def export(m: GLM):
        if export_dtype != torch.float32:             # a converted copy; training goes on in fp32
            m = copy.deepcopy(m).to(export_dtype)
        save_model(m, export_dir, source_dir=tok_dir)
        write_generation_config(export_dir, m.config)

    trainer = Trainer(model, tc, batcher, val_rows, out, device=args.device, dist_info=dist_info,
                      pad_id=special.pad, export=export, progress=not args.quiet, fsdp=args.fsdp)
    if ckpt.is_file() and args.resume:
        ck = trainer.load()
        if dist_info.main:
            print(f"resumed {out} at step {ck['step']} ({ck['tokens_seen']} tokens)", file=sys.stderr)
    if args.eval_only:                                 # the validation loss of --init's model, nothing trained
        val = trainer.validate()
        if dist_info.main:
            print(f"validation loss {val:.4f} over {len(val_rows)} rows of {len(val_ids)} held-out units",
                  file=sys.stderr)
        return {"val_loss": val}
    if dist_info.main:
        (out / "run.json").write_text(json.dumps({
            "argv": sys.argv, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "model_config": cfg.to_dict(), "train_config": asdict(tc), "world": dist_info.world,
            "train_units": int(len(train_ids)), "val_units": int(len(val_ids)),
            "train_tokens_in_cache": cache.num_tokens, "params": cfg.num_params(),
        }, indent=2, ensure_ascii=False, default=str))
        if not args.quiet:
            print(f"model {cfg.num_params() / 1e6:.2f}M parameters; {len(train_ids)} training units "
                  f"({cache.num_tokens} tokens), {len(val_rows)} validation rows; {rows} rows x {args.seq_len} "
                  f"tokens per step on {dist_info.world} process(es)", file=sys.stderr)
    t0 = time.time()
    res = trainer.run()
    res["wall"] = time.time() - t0
    res["flops_per_token"] = flops_per_token(cfg, args.seq_len)
    if dist_info.main:
        print(f"done: step {res['step']}, {res['tokens']} tokens, {res['tok_per_s']:.0f} tokens/s "
              f"({res['tok_per_s'] * res['flops_per_token'] / 1e9:.1f} GFLOP/s of model FLOPs)"
              + (f", validation loss {res['val_loss']:.4f}" if res["val_loss"] is not None else "")
              + f"; model in {export_dir}", file=sys.stderr)
    if dist_info.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return res
