"""glmkit pretrain: GLM's autoregressive blank-infilling pretraining (and chat fine-tuning with --sft)."""
from __future__ import annotations

EXAMPLES = """examples:
  glmkit train-tokenizer --input corpus/ --vocab-size 8192 --out tok/
  glmkit pretrain --model-config glm-tiny --tokenizer tok/ --data corpus/ --out runs/tiny --steps 2000
  glmkit pretrain ... --out runs/tiny --resume              # continue a stopped or killed run
  torchrun --nproc_per_node 2 -m glmkit pretrain ...       # data-parallel (gloo on CPU, NCCL on GPU)
  glmkit pretrain --init runs/tiny/model --sft --data instruct/alpaca_zh.json --out runs/tiny-chat \\
      --steps 300 --lr 3e-4 --replace name=glm-tiny         # chat fine-tuning, loss on the answers only
  glmkit plot runs/tiny                                    # loss and learning-rate curves -> training.png

Data: plain text (documents separated by blank lines), JSONL ({"text": ...}) and the chinese-poetry JSON
(title + paragraphs), files or folders; bad files and lines are reported with file:line and skipped. Each
document is cut to fit a row, its spans sampled ([MASK]: Poisson(3) spans ~15%; [sMASK]: sentences ~15%;
[gMASK]: a 50-100% suffix; mixture --objective, GLM-130B's mask=0.3,gmask=0.7 by default) and packed into rows
of --seq-len tokens. OUT gets metrics.jsonl, checkpoint.pt (atomic; --resume continues exactly) and model/
(a glmkit model folder: glmkit chat --model OUT/model)."""


def add_arguments(p):
    g = p.add_argument_group("model and data")
    g.add_argument("--model-config", default="glm-tiny", metavar="FILE|PRESET",
                   help="architecture: preset glm-tiny (4 layers x 256, ChatGLM-6B layout) or glm-test (2 x 64), or a "
                        "JSON file (glmkit/official config.json, or {hidden_size, num_layers, num_heads, ...})")
    g.add_argument("--tokenizer", metavar="DIR", help="folder with ice_text.model (glmkit train-tokenizer)")
    g.add_argument("--init", metavar="DIR", help="start from this model folder's weights (fine-tuning)")
    g.add_argument("--data", nargs="+", required=True, metavar="PATH", help="training files or folders")
    g.add_argument("--exclude", action="append", metavar="GLOB",
                   help="leave out files whose path matches (repeatable), e.g. '*/poet.tang.57000.json'")
    g.add_argument("--val-data", nargs="+", metavar="PATH",
                   help="held-out files (default: --val-docs units drawn from the training data)")
    g.add_argument("--val-docs", type=int, default=200, metavar="N", help="held-out units (default 200)")
    g.add_argument("--sft", action="store_true",
                   help="data are instruction pairs (instruction/input/output JSON): chat fine-tuning")
    g.add_argument("--mix", nargs="+", metavar="PATH",
                   help="with --sft: plain documents trained with blank infilling alongside the chats (so the "
                        "model keeps filling blanks)")
    g.add_argument("--mix-units", type=int, default=2000, metavar="N",
                   help="how many document units --mix adds (a seeded random choice; default 2000)")
    g.add_argument("--replace", action="append", metavar="KEY=VALUE",
                   help="fill {{KEY}} placeholders of instruction data (e.g. name=glm-tiny)")
    g.add_argument("--eval-only", action="store_true",
                   help="only print the validation loss of --init's model on the held-out units, train nothing")
    g.add_argument("--out", "-o", required=True, metavar="DIR", help="run folder (created)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--seq-len", type=int, default=256, help="tokens per packed row (default 256)")
    t.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per optimizer step over all processes (rows = batch-tokens / seq-len)")
    t.add_argument("--micro-batch", type=int, default=0, metavar="ROWS",
                   help="rows per forward on each process (gradient accumulation; default: all at once)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr x this")
    t.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    t.add_argument("--emb-grad-shrink", type=float, default=1.0, metavar="ALPHA",
                   help="GLM-130B's embedding gradient shrink (they used 0.1; 1 = off)")
    t.add_argument("--no-fp32-softmax", action="store_true",
                   help="let autocast run attention softmax in bf16 (default: fp32)")
    t.add_argument("--objective", default="mask=0.3,gmask=0.7", help="span-kind mixture (mask, smask, gmask)")
    t.add_argument("--extra-sentence-ends", default="", metavar="CHARS",
                   help="characters that also end an [sMASK] sentence (default: 。！？.!? and newline); "
                        "'，；' makes every line of a classical poem one")
    t.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK is picked)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="bfloat16 autocast; auto = bf16 on GPUs that have it, fp32 on CPU")
    r.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP under torchrun")
    r.add_argument("--export-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the weights written to OUT/model (training is float32 either way)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    r.add_argument("--eval-every", type=int, default=100, metavar="STEPS")
    r.add_argument("--save-every", type=int, default=100, metavar="STEPS")
    r.add_argument("--quiet", action="store_true", help="no progress bar or summaries")


def run(args) -> int:
    import os

    if args.device == "cuda" and "LOCAL_RANK" in os.environ:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    from ..train.pretrain import run as pretrain
    pretrain(args)
    return 0
