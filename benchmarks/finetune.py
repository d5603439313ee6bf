"""Benchmark fine-tuning steps: glmkit LoRA / P-tuning v2 / full against transformers + peft LoRA, same shapes.

What it measures, each engine in a fresh process (so peak RSS is its own), --threads threads (default 2), on
random weights of the ChatGLM3-6B shape (hidden 4096, 32 heads, 2 key/value groups, FFN 13696, vocab 65024):
  tokens/s   --seq (512) tokens per step (batch 1), AdamW steps after one untimed warm-up step: the median of
             --steps (2) timed steps, forward + backward + optimizer
  peak RSS   VmHWM of that process over the training steps (weights, gradients and optimizer state of what is
             trained, activations), reset after the model is built; the build's own peak is printed beside it
Engines (LoRA: rank 8, alpha 16, no dropout, on every linear layer of the blocks, as peft's all-linear):
  glmkit-lora       our GLM in float32, --layers blocks (default 2), LoRA from glmkit/adapters
  peft-lora         transformers' GlmForCausalLM, the same shape and --layers, float32, peft.get_peft_model:
                    what LLaMA-Factory runs for GLM-4 (same arithmetic per token; its attention has separate
                    q/k/v projections, so it carries three LoRA pairs where ours has one on the fused
                    query_key_value, as peft on the official ChatGLM3 code does: 0.59M vs 0.53M per block)
  glmkit-ptuning    our GLM float32, --layers blocks, P-tuning v2 with 128 virtual tokens (the official default)
  glmkit-full       our GLM float32, --layers blocks, every weight trained (AdamW state: 16 bytes per weight)
  glmkit-lora-int4  the whole 28-layer ChatGLM3-6B INT4 (the folder benchmarks/decode.py builds,
                    /tmp/glmkit-bench/chatglm3-6b-int4), frozen and quantized, LoRA trained through it, with
                    gradient checkpointing: the "fine-tune a 6B model on a laptop" case (peak RSS target 6 GB)
Why --layers and not the whole 6B in float: a float32 6B model is 25 GB (this machine has 24 GB), and bf16
matrix multiplies on this CPU (AVX2, no bf16 arithmetic) are so slow that one 512-token step takes tens of
minutes; per-token cost and memory scale with the layers, and both float engines run the same slice.

    python benchmarks/finetune.py                            # everything (~20 min on 2 cores)
    python benchmarks/finetune.py --engines glmkit-lora,peft-lora --layers 1 --seq 256
Last line: lora_tok_s_vs_peft=R lora_int4_rss_gb=G lora_rss_vs_peft=R
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ["glmkit-lora", "peft-lora", "glmkit-ptuning", "glmkit-full", "glmkit-lora-int4"]
SHAPE = dict(hidden_size=4096, num_heads=32, num_kv_heads=2, head_dim=128, ffn_hidden_size=13696, vocab_size=65024)
INT4_DIR = Path("/tmp/glmkit-bench/chatglm3-6b-int4")
RSS_TARGET_GB = 6.0


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM (Linux only)")


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0), so the peak is the training loop's own and not
    a temporary of building the model (init_weights' scratch tensors, peft's wrapping)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def timed_steps(step, n: int) -> list[float]:
    step()                                                       # warm-up (allocations, first-call work)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def glmkit_model(layers: int):
    import torch

    from glmkit.config import ModelConfig
    from glmkit.model import GLM
    cfg = ModelConfig(family="chatglm3", num_layers=layers, max_seq_len=8192, **SHAPE)
    torch.manual_seed(0)
    return GLM(cfg).init_weights(std=0.02, seed=0)


def lm_step(model, opt, ids, loss_of):
    """One forward + backward + AdamW step of the mean next-token loss over ids [1, T]."""
    loss = loss_of(model, ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def child(engine: str, layers: int, seq: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    try:
        from glmkit import kernels
        if kernels.available():
            kernels.set_num_threads(threads)
    except ImportError:
        pass
    if engine.startswith("glmkit"):
        from glmkit.train.loop import return_freed_memory
        return_freed_memory()                  # as glmkit finetune's training loop does (Trainer)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 60000, (1, seq), generator=g)
    def plain(m, x):                     # what glmkit finetune runs (train/loop.batch_loss: GLM.lm_loss)
        targets = torch.roll(x, -1, 1)
        targets[:, -1] = -100
        return m(x, targets=targets) / (x.shape[1] - 1)
    if engine == "peft-lora":
        import peft
        from transformers import GlmConfig, GlmForCausalLM
        cfg = GlmConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"],
                        intermediate_size=SHAPE["ffn_hidden_size"], num_hidden_layers=layers,
                        num_attention_heads=SHAPE["num_heads"], num_key_value_heads=SHAPE["num_kv_heads"],
                        head_dim=SHAPE["head_dim"], partial_rotary_factor=0.5, attention_bias=True,
                        max_position_embeddings=8192, pad_token_id=0, eos_token_id=2, bos_token_id=1,
                        torch_dtype="float32")
        torch.manual_seed(0)
        base = GlmForCausalLM(cfg)
        lcfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"])
        model = peft.get_peft_model(base, lcfg)
        model.train()
        forward = lambda m, x: m(input_ids=x, labels=x).loss        # noqa: E731  (transformers' own loss)
        params = [p for p in model.parameters() if p.requires_grad]
    elif engine == "glmkit-lora-int4":
        from glmkit.adapters.lora import apply_lora, lora_parameters
        from glmkit.checkpoint import load_model
        from glmkit.quant import prepare_model
        model, _ = load_model(INT4_DIR)
        prepare_model(model)
        apply_lora(model, 8, 16.0, 0.0, "all", seed=0)
        model.grad_checkpointing = True
        model.train()
        forward, params = plain, lora_parameters(model)
    else:
        model = glmkit_model(layers)
        model.train()
        forward = plain
        if engine == "glmkit-lora":
            from glmkit.adapters.lora import apply_lora, lora_parameters
            apply_lora(model, 8, 16.0, 0.0, "all", seed=0)
            params = lora_parameters(model)
        elif engine == "glmkit-ptuning":
            from glmkit.adapters.ptuning import PrefixEncoder
            from glmkit.train.finetune import Tuned
            model.requires_grad_(False)
            enc = PrefixEncoder(model.config, 128)
            model = Tuned(model, enc)
            params = list(enc.parameters())
        else:
            params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    build_peak = peak_rss_bytes()
    reset_peak_rss()
    times = timed_steps(lambda: lm_step(model, opt, ids, forward), steps)
    dt = statistics.median(times)
    return {"tok_s": seq / dt, "step_s": dt, "peak_rss": peak_rss_bytes(), "build_peak": build_peak,
            "trainable": sum(p.numel() for p in params)}


def run_child(engine, args) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--layers", str(args.layers), "--seq", str(args.seq),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3 * 3600)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["wall"] = time.perf_counter() - t
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--layers", type=int, default=2, help="blocks of the float engines (default 2)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per engine (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.seq, args.steps, args.threads)))
        return
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "glmkit-lora-int4" in engines and not (INT4_DIR / "config.json").is_file():
        print(f"{INT4_DIR} is missing: build it with `python benchmarks/serve_load.py --shape chatglm3-6b "
              "--scenario throughput --clients 1` (or benchmarks/decode.py); skipping glmkit-lora-int4",
              file=sys.stderr)
        engines.remove("glmkit-lora-int4")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    res = {}
    for e in engines:
        print(f"[{e}] ...", file=sys.stderr, flush=True)
        res[e] = run_child(e, args)
        print(f"[{e}] {res[e]}", file=sys.stderr, flush=True)
    print(f"\nChatGLM3-6B shape, {args.layers} blocks for the float engines (28 for INT4), {args.seq} tokens per step, "
          f"{args.threads} threads, {cpu}, {os.cpu_count()} CPUs")
    print("| engine | trainable params | tokens/s | s per step | peak RSS GiB (training) | peak RSS GiB (building) |")
    print("|---|---|---|---|---|---|")
    for e, r in res.items():
        if "error" in r:
            print(f"| {e} | | error: {r['error'][:80]} | | | |")
            continue
        print(f"| {e} | {r['trainable'] / 1e6:.2f}M | {r['tok_s']:.1f} | {r['step_s']:.1f} | "
              f"{r['peak_rss'] / 2**30:.2f} | {r['build_peak'] / 2**30:.2f} |")
    a, b = res.get("glmkit-lora", {}), res.get("peft-lora", {})
    ratio = a["tok_s"] / b["tok_s"] if "tok_s" in a and "tok_s" in b else float("nan")
    rss_ratio = a["peak_rss"] / b["peak_rss"] if "peak_rss" in a and "peak_rss" in b else float("nan")
    q = res.get("glmkit-lora-int4", {})
    # the INT4 target counts the whole process (loading included): a laptop has to survive both
    rss4 = max(q["peak_rss"], q["build_peak"]) / 1e9 if "peak_rss" in q else float("nan")
    print(f"\nglmkit LoRA / peft LoRA tokens/s: {ratio:.2f}x (target >= 1.0); LoRA on the INT4 6B: peak RSS "
          f"{rss4:.2f} GB (target <= {RSS_TARGET_GB}) {'OK' if rss4 <= RSS_TARGET_GB else 'MISSED'}")
    print(f"lora_tok_s_vs_peft={ratio:.3f} lora_int4_rss_gb={rss4:.2f} lora_rss_vs_peft={rss_ratio:.3f}")


if __name__ == "__main__":
    main()
