"""AdvertiseGen on glm-tiny: BLEU-4 and ROUGE-1/2/L before and after LoRA and P-tuning v2, and what the
fine-tuning does to general chat with and without --mix.

The official ChatGLM-6B recipe (ptuning/main.py) trains on AdvertiseGen's 114k train.json and scores dev.json;
here only `../shared/corpora/advertisegen/dev.json` (1070 records) exists, so it is split by position:
  train  records 1..970    (written to WORK/train.jsonl)
  test   records 971..1070 (WORK/test.jsonl, never seen in training)
Every step is a glmkit command run as a user would (printed before it runs):
  glmkit eval       the base glm-tiny on test (greedy, 128 new tokens, scored as the official compute_metrics)
  glmkit finetune   lora | ptuning, with and without --mix of general chat data (alpaca zh/en demo + identity,
                    the data glm-tiny's own chat SFT used), the official --max-source-length 64
                    --max-target-length 128
  glmkit eval       each adapter on test, and base + each adapter on "general chat": the 91 identity
                    questions (identity.json, {{name}} = glm-tiny, {{author}} = glmkit), whose answers glm-tiny
                    learnt in its chat SFT; a fine-tune that forgets how to chat loses ROUGE there
Prints a markdown table; the numbers are a 7M-parameter toy's on 970 examples, not comparable in size with
the official ChatGLM-6B row printed beside them (P-tuning v2 on the full train set).

    python benchmarks/advertisegen.py                    # all four fine-tunes, 250 steps: ~35 min on 2 quiet cores
    python benchmarks/advertisegen.py --steps 100 --limit 50 --runs lora,lora-mix   # the README table
    python benchmarks/advertisegen.py --steps 20 --limit 10   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
ADGEN = SHARED / "corpora" / "advertisegen" / "dev.json"
INSTRUCT = SHARED / "corpora" / "instruct"
OFFICIAL = {"bleu-4": 8.10, "rouge-1": 31.12, "rouge-2": 7.11, "rouge-l": 24.97}   # ChatGLM-6B README, P-tuning v2
KEYS = ["bleu-4", "rouge-1", "rouge-2", "rouge-l"]


def glmkit(*args: str) -> None:
    cmd = [sys.executable, "-m", "glmkit", *args]
    print("$ glmkit " + " ".join(args), file=sys.stderr, flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"  ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)


def split(work: Path, n_train: int) -> tuple[Path, Path, Path]:
    lines = [ln for ln in ADGEN.read_text(encoding="utf-8").splitlines() if ln.strip()]
    train, test = work / "train.jsonl", work / "test.jsonl"
    train.write_text("\n".join(lines[:n_train]) + "\n", encoding="utf-8")
    test.write_text("\n".join(lines[n_train:]) + "\n", encoding="utf-8")
    ident = json.loads((INSTRUCT / "identity.json").read_text(encoding="utf-8"))
    chat = work / "identity.jsonl"
    chat.write_text("".join(json.dumps({"q": r["instruction"], "a": r["output"].replace("{{name}}", "glm-tiny")
                                        .replace("{{author}}", "glmkit")}, ensure_ascii=False) + "\n"
                            for r in ident), encoding="utf-8")
    return train, test, chat


def evaluate(model: str, adapter: Path | None, data: Path, cols: tuple[str, str], out: Path, args,
             max_new: int) -> dict:
    if not (out / "metrics.json").is_file():
        extra = ["--adapter", str(adapter)] if adapter else []
        glmkit("eval", "--model", model, *extra, "--data", str(data), "--prompt-column", cols[0],
               "--response-column", cols[1], "--max-new-tokens", str(max_new), "--batch-size", "8",
               "--limit", str(args.limit), "--out", str(out), "--threads", str(args.threads))
    return json.loads((out / "metrics.json").read_text())


def finetune(model: str, method: str, train: Path, out: Path, args, mix: bool) -> Path:
    if not (out / "adapter").is_dir():
        m = ["--mix", str(INSTRUCT / "alpaca_zh_demo.json"), str(INSTRUCT / "alpaca_en_demo.json"),
             str(INSTRUCT / "identity.json"), "--mix-ratio", str(args.mix_ratio),
             "--replace", "name=glm-tiny", "--replace", "author=glmkit"] if mix else []
        lr = args.lora_lr if method == "lora" else args.ptuning_lr
        spec = (["--lora-rank", str(args.lora_rank), "--lora-alpha", str(2 * args.lora_rank)] if method == "lora"
                else ["--pre-seq-len", str(args.pre_seq_len)])
        glmkit("finetune", "--model", model, "--method", method, *spec, "--data", str(train),
               "--prompt-column", "content", "--response-column", "summary", "--max-source-length", "64",
               "--max-target-length", "128", *m, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--lr", str(lr), "--warmup", str(max(1, args.steps // 20)), "--out", str(out), "--quiet",
               "--threads", str(args.threads), "--seed", "0")
    return out / "adapter"


def row(name: str, task: dict, chat: dict | None) -> str:
    cells = [f"{task[k]:.2f}" for k in KEYS]
    chat_cells = [f"{chat['rouge-l']:.2f}", f"{chat['bleu-4']:.2f}"] if chat else ["", ""]
    return "| " + " | ".join([name, *cells, *chat_cells]) + " |"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/glmkit-advertisegen"))
    ap.add_argument("--model", default=str(ROOT / "glmkit" / "models" / "glm-tiny"))
    ap.add_argument("--train-records", type=int, default=970)
    ap.add_argument("--steps", type=int, default=250, help="optimizer steps per fine-tune (250 x 8 = ~2 epochs)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--pre-seq-len", type=int, default=128)
    ap.add_argument("--ptuning-lr", type=float, default=2e-2, help="the official P-tuning v2 rate")
    ap.add_argument("--mix-ratio", type=float, default=0.2)
    ap.add_argument("--limit", type=int, default=100, help="test examples scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="lora,lora-mix,ptuning,ptuning-mix",
                    help="fine-tunes to make, in order (METHOD or METHOD-mix)")
    args = ap.parse_args()
    if not ADGEN.is_file():
        sys.exit(f"{ADGEN} is missing: this benchmark needs ../shared/corpora")
    args.work.mkdir(parents=True, exist_ok=True)
    train, test, chat = split(args.work, args.train_records)
    adgen, ident = ("content", "summary"), ("q", "a")
    w = args.work
    results = [("glm-tiny (base)", evaluate(args.model, None, test, adgen, w / f"eval-base-{args.limit}", args, 128),
                evaluate(args.model, None, chat, ident, w / f"chat-base-{args.limit}", args, 64))]
    for tag in args.runs.split(","):
        method, mix = tag.split("-")[0], tag.endswith("-mix")
        ad = finetune(args.model, method, train, w / f"run-{tag}-{args.steps}", args, mix)
        results.append((f"glm-tiny + {method}" + (f" --mix ({args.mix_ratio})" if mix else ""),
                        evaluate(args.model, ad, test, adgen, w / f"eval-{tag}-{args.steps}-{args.limit}", args, 128),
                        evaluate(args.model, ad, chat, ident, w / f"chat-{tag}-{args.steps}-{args.limit}", args, 64)))
    print(f"\nAdvertiseGen dev.json records 1-{args.train_records} train, {args.train_records + 1}- test "
          f"(first {args.limit} scored), greedy, 128 new tokens; {args.steps} steps x {args.batch_size}; "
          f"general chat = identity questions, 64 new tokens")
    print("| model | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | chat ROUGE-L | chat BLEU-4 |")
    print("|---|---|---|---|---|---|---|")
    for name, task, chat_m in results:
        print(row(name, task, chat_m))
    print(row("ChatGLM-6B + P-tuning v2 (official README, full train set)", OFFICIAL, None))


if __name__ == "__main__":
    main()
