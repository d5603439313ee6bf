"""glmkit pretrain: exact resume after SIGKILL, 2-process DDP equals one process, bad data, SFT, export."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmkit.train.plot import read_metrics

ROOT = Path(__file__).resolve().parents[1]

POEMS = [
    {"title": "靜夜思", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]},
    {"title": "春曉", "paragraphs": ["春眠不覺曉，處處聞啼鳥。", "夜來風雨聲，花落知多少。"]},
    {"title": "登鸛雀樓", "paragraphs": ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"]},
    {"title": "相思", "paragraphs": ["紅豆生南國，春來發幾枝。", "願君多采擷，此物最相思。"]},
]
ENGLISH = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.\n"
           "To be, or not to be, that is the question. All the world's a stage, and all the men and women merely "
           "players.\n")


def synthetic_poems(n: int, seed: int = 0) -> list[dict]:
    """Random 5-character-line poems over the characters of POEMS (varied enough to train a tokenizer)."""
    import random

    rng = random.Random(seed)
    chars = sorted({c for p in POEMS for line in p["paragraphs"] for c in line if c not in "，。"})
    line = lambda: "".join(rng.choice(chars) for _ in range(5))           # noqa: E731
    return [{"title": line()[:2], "author": "x",
             "paragraphs": [f"{line()}，{line()}。" for _ in range(2)]} for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    poems = [dict(p, author="x") for p in POEMS] * 30 + synthetic_poems(200)
    (d / "poems.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    words = ENGLISH.replace(".", " ").replace(",", " ").split()
    import random
    rng = random.Random(1)
    extra = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(200)]
    (d / "english.txt").write_text("\n\n".join([ENGLISH] * 20 + extra), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    from glmkit.train.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus], out, vocab_size=1000, seed=0, progress=False)
    return out


def pretrain_cmd(tok_dir, corpus, out, *extra, steps=12):
    return ["--model-config", "glm-test", "--tokenizer", str(tok_dir), "--data", str(corpus),
            "--out", str(out), "--steps", str(steps), "--seq-len", "64", "--batch-tokens", "512",
            "--warmup", "3", "--lr", "3e-3", "--val-docs", "8", "--eval-every", "4", "--save-every", "4",
            "--threads", "1", "--quiet", *extra]


def run_cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "glmkit", "pretrain", *args], env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def losses(run_dir) -> dict[int, float]:
    train, _ = read_metrics(run_dir)
    return {r["step"]: r["loss"] for r in train}


def test_pretrain_learns_writes_metrics_and_exports(tok_dir, corpus, tmp_path):
    import glmkit

    r = run_cli(pretrain_cmd(tok_dir, corpus, tmp_path / "run", steps=30))
    assert r.returncode == 0, r.stderr
    lo = losses(tmp_path / "run")
    assert sorted(lo) == list(range(1, 31))
    assert lo[30] < lo[1] - 1.0, lo                       # it learns the tiny corpus
    _, val = read_metrics(tmp_path / "run")
    assert [v["step"] for v in val] == [4, 8, 12, 16, 20, 24, 28, 30]
    train_rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["tok_per_s"] > 0 for row in train_rows if row["type"] == "train")
    # the exported folder is a model glmkit loads and runs like an official ChatGLM-6B one
    pipe = glmkit.load(tmp_path / "run" / "model")
    assert pipe.model.config.family == "chatglm" and pipe.model.config.prefix_lm
    assert isinstance(pipe.generate("床前明月光，", max_new_tokens=4, temperature=0), str)
    # --eval-only on the exported model reproduces the run's last validation loss (same held-out units)
    r3 = run_cli(["--init", str(tmp_path / "run" / "model"), "--eval-only", "--data", str(corpus),
                  "--out", str(tmp_path / "eval"), "--seq-len", "64", "--val-docs", "8", "--threads", "1"])
    assert r3.returncode == 0, r3.stderr
    got = float(re.search(r"validation loss ([0-9.]+)", r3.stderr).group(1))
    assert got == pytest.approx(val[-1]["val_loss"], abs=2e-4)
    # an existing run is not overwritten by accident
    r2 = run_cli(pretrain_cmd(tok_dir, corpus, tmp_path / "run", steps=30))
    assert r2.returncode != 0 and "--resume" in r2.stderr


def test_resume_after_sigkill_gives_the_same_losses(tok_dir, corpus, tmp_path):
    steps = 24
    ref = tmp_path / "ref"
    r = run_cli(pretrain_cmd(tok_dir, corpus, ref, steps=steps))
    assert r.returncode == 0, r.stderr
    want = losses(ref)

    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "glmkit", "pretrain", *pretrain_cmd(tok_dir, corpus, run, steps=steps)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill it once it has logged step 9: it is then inside step 10 (last checkpoint: step 8)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if (run / "metrics.jsonl").is_file() and 9 in losses(run):
            break
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = max(losses(run))
    assert done_before < steps
    r = run_cli(pretrain_cmd(tok_dir, corpus, run, "--resume", steps=steps))
    assert r.returncode == 0, r.stderr
    got = losses(run)                                    # the resumed run's lines win for re-done steps
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6), (s, got[s], want[s])
    # no temporary checkpoint files are left behind
    assert not list(run.glob("*.tmp*"))


@pytest.fixture(scope="module")
def single8(tok_dir, corpus, tmp_path_factory) -> Path:
    """An 8-step single-process run: the reference of the distributed and micro-batch tests."""
    out = tmp_path_factory.mktemp("single") / "run"
    r = run_cli(pretrain_cmd(tok_dir, corpus, out, steps=8))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(tok_dir, corpus, tmp_path, mode, single8):
    pytest.importorskip("torch.distributed")
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this PyTorch build has no gloo backend")
    steps = 8
    single = single8
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ddp = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "glmkit", "pretrain", *pretrain_cmd(tok_dir, corpus, ddp, steps=steps),
                        *(["--fsdp"] if mode == "fsdp" else [])],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run_info = json.loads((ddp / "run.json").read_text())
    assert run_info["world"] == 2
    a, b = losses(single), losses(ddp)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=2e-5), (s, a[s], b[s])
    _, va = read_metrics(single)
    _, vb = read_metrics(ddp)
    assert [v["val_loss"] for v in vb] == pytest.approx([v["val_loss"] for v in va], rel=2e-5)
    # the exported model (gathered from the shards under FSDP) is the single-process one, within float noise
    from safetensors.torch import load_file
    wa, wb = load_file(single / "model" / "model.safetensors"), load_file(ddp / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-4, k


def test_micro_batches_equal_one_batch(tok_dir, corpus, tmp_path, single8):
    r2 = run_cli(pretrain_cmd(tok_dir, corpus, tmp_path / "b", "--micro-batch", "3", steps=8))
    assert r2.returncode == 0, r2.stderr
    a, b = losses(single8), losses(tmp_path / "b")
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=2e-5)


def test_bad_data_is_reported_and_skipped(tok_dir, corpus, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "good.json").write_text((corpus / "poems.json").read_text(encoding="utf-8"), encoding="utf-8")
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") + ENGLISH.encode())
    (d / "broken.jsonl").write_text('{"text": "fine line"}\n{"text": oops\n{"text": "another"}\n')
    r = run_cli(pretrain_cmd(tok_dir, d, tmp_path / "run", steps=2)[:-1])     # without --quiet: warnings
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "empty.txt: empty file" in err
    assert "latin1.txt:1: not UTF-8" in err
    assert "broken.jsonl:2: not JSON" in err
    assert "tokens/s" in err                               # the summary line reports throughput


def test_sft_trains_on_answers_in_chat_format(tok_dir, corpus, tmp_path):
    import glmkit

    base = tmp_path / "base"
    assert run_cli(pretrain_cmd(tok_dir, corpus, base, steps=2)).returncode == 0
    data = tmp_path / "sft.json"
    pairs = [{"instruction": "你是谁", "input": "", "output": "我是{{name}}。"},
             {"instruction": "Who are you?", "input": "", "output": "I am {{name}}."}] * 20
    data.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    args = ["--init", str(base / "model"), "--sft", "--data", str(data), "--replace", "name=tiny",
            "--out", str(tmp_path / "sft"), "--steps", "60", "--seq-len", "64", "--batch-tokens", "512",
            "--warmup", "5", "--lr", "5e-3", "--val-docs", "0", "--eval-every", "0", "--save-every", "0",
            "--threads", "1", "--quiet"]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    lo = losses(tmp_path / "sft")
    assert lo[60] < 0.2, lo
    pipe = glmkit.load(tmp_path / "sft" / "model")
    assert pipe.chat([{"role": "user", "content": "你是谁"}], temperature=0, max_new_tokens=10) == "我是tiny。"


def test_sft_cache_mixes_documents_in(tok_dir, corpus, tmp_path):
    """--mix: chat pairs (prompt/answer units) plus a seeded choice of plain document units."""
    from glmkit.tokenizer import load_tokenizer
    from glmkit.train.data import build_cache

    tok = load_tokenizer(tok_dir, "chatglm")
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"instruction": "你好", "input": "", "output": "春眠不覺曉"}] * 5,
                               ensure_ascii=False), encoding="utf-8")
    c = build_cache([data], tok, tmp_path / "c1", 64, chat=True, mix_paths=[corpus], mix_units=7,
                    mix_max_unit=40, seed=3, progress=False)
    splits = c.units[:, 2]
    assert (splits >= 0).sum() == 5 and (splits == -1).sum() == 7
    assert c.units[splits == -1, 1].max() <= 40
    again = build_cache([data], tok, tmp_path / "c2", 64, chat=True, mix_paths=[corpus], mix_units=7,
                        mix_max_unit=40, seed=3, progress=False)
    assert [c.unit(i).tolist() for i in range(len(c))] == [again.unit(i).tolist() for i in range(len(again))]
