"""glmkit finetune: LoRA, QLoRA, P-tuning v2 or full fine-tuning of a GLM on chat data."""
from __future__ import annotations

EXAMPLES = """examples:
  glmkit finetune --model ~/models/chatglm3-6b --method lora --data train.json --out runs/lora --epochs 3
  glmkit finetune --model ~/models/chatglm3-6b --quantize int4 --method lora --data train.json --out runs/qlora
  glmkit finetune --model ~/models/chatglm-6b --quantize int4 --method ptuning --pre-seq-len 128 \\
      --data AdvertiseGen/train.json --prompt-column content --response-column summary --out runs/ptuning
  glmkit finetune ... --out runs/lora --resume                 # after a crash, Ctrl-C or kill -9
  torchrun --nproc_per_node 2 -m glmkit finetune ...           # data-parallel
  glmkit chat --model ~/models/chatglm3-6b --adapter runs/lora/adapter
  glmkit eval --model ~/models/chatglm3-6b --adapter runs/lora/adapter --data dev.json \\
      --prompt-column content --response-column summary
  glmkit plot runs/lora                                        # loss curves -> runs/lora/training.png

Data (--data-format auto detects per record): AdvertiseGen-style columns (--prompt-column/--response-column/
--history-column), ChatGLM3 conversations (role/content/loss, tools, observation), alpaca (instruction/input/
output) and ShareGPT (human/gpt/function_call/observation, tools); JSON or JSONL. Each example is rendered in
the base model's own chat format, the loss on its assistant turns; a bad record is reported as file:line and
skipped; a dataset with nothing usable stops before the model is loaded. OUT gets checkpoint.pt (atomic;
--resume continues exactly), metrics.jsonl, run.json and adapter/ (a PEFT LoRA folder or an official P-tuning v2
folder: peft, LLaMA-Factory and the official scripts load them) or model/ (full fine-tuning)."""


def add_arguments(p):
    g = p.add_argument_group("model and method")
    g.add_argument("--model", "-m", required=True, metavar="NAME|DIR",
                   help="the base model folder (official or glmkit), or a name of the model store")
    g.add_argument("--method", required=True, choices=["lora", "ptuning", "full"])
    g.add_argument("--quantize", "-q", default=None, metavar="int4|int8",
                   help="keep the base quantized and frozen while training (QLoRA; P-tuning as the official INT4 "
                        "recipe)")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default="all", metavar="NAMES",
                   help="comma list: our names (qkv,out,up,down,output), official ones (query_key_value,dense,"
                        "dense_h_to_4h,dense_4h_to_h; q_proj...down_proj for GlmForCausalLM) or all (default)")
    g.add_argument("--pre-seq-len", type=int, default=128, help="P-tuning v2 virtual tokens (default 128, official)")
    g.add_argument("--prefix-projection", action="store_true", help="P-tuning v2 with the MLP re-parameterisation")
    g.add_argument("--freeze-layers", type=int, default=0, metavar="N",
                   help="full fine-tuning: keep the embedding and the first N layers frozen")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, ~30%% slower)")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", required=True, metavar="PATH", help="training files or folders")
    d.add_argument("--data-format", default="auto", choices=["auto", "columns", "chatglm3", "alpaca", "sharegpt"])
    d.add_argument("--prompt-column", default=None, metavar="C")
    d.add_argument("--response-column", default=None, metavar="C")
    d.add_argument("--history-column", default=None, metavar="C")
    d.add_argument("--max-source-length", type=int, default=None, metavar="N", help="cut prompts to N tokens")
    d.add_argument("--max-target-length", type=int, default=None, metavar="N", help="cut answers to N tokens")
    d.add_argument("--each-turn", action="store_true",
                   help="ChatGLM-6B/2: one sequence per assistant turn (default: the last turn, as the official "
                        "script)")
    d.add_argument("--replace", action="append", metavar="KEY=VALUE", help="fill {{KEY}} placeholders of the data")
    d.add_argument("--mix", nargs="+", metavar="PATH",
                   help="general chat data interleaved with the task data, so the model keeps chatting")
    d.add_argument("--mix-ratio", type=float, default=0.0, metavar="R", help="share of --mix examples (e.g. 0.2)")
    d.add_argument("--eval-data", nargs="+", metavar="PATH", help="held-out examples: loss every --eval-every steps")
    d.add_argument("--eval-every", type=int, default=100, metavar="N")
    o = p.add_argument_group("training")
    o.add_argument("--out", "-o", required=True, metavar="NAME|DIR",
                   help="run folder (created); a bare NAME (no slash) goes into the model store, where --model/"
                        "--adapter NAME then find its model/ or adapter/")
    o.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    o.add_argument("--steps", type=int, default=0, help="optimizer steps (default: from --epochs)")
    o.add_argument("--epochs", type=float, default=1.0)
    o.add_argument("--batch-size", type=int, default=1,
                   help="examples per forward on each process (a step: batch-size x grad-accum x processes)")
    o.add_argument("--grad-accum", type=int, default=1, help="forwards per optimizer step on each process")
    o.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: lora 1e-4, ptuning 2e-2 as the official script, full 1e-5)")
    o.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to lr x this (default 0)")
    o.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    o.add_argument("--save-every", type=int, default=100, metavar="N", help="checkpoint every N steps")
    o.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 autocast on GPUs that have it, fp32 on CPU")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="cpu", help="cpu, cuda (under torchrun: cuda:LOCAL_RANK)")
    o.add_argument("--threads", type=int, default=None, metavar="N")
    o.add_argument("--quiet", action="store_true", help="no progress bar or summary lines")


def run(args) -> int:
    from ..store import out_path, resolve
    from ..train.finetune import run as finetune

    args.model = resolve(args.model)
    args.out = str(out_path(args.out))
    finetune(args)
    return 0
