"""glmkit finetune end to end on a 2-layer model (glm-tiny's first two layers: trained weights, so a few examples
can be learned): each method overfits three examples and then answers them through Pipeline.chat; SIGKILL and
--resume give the losses of an uninterrupted run; 2 processes equal 1; bad data; non-finite losses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glmkit.train.plot import read_metrics

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [("你好", "你好，我是小助手。"), ("天空是什么颜色", "天空是蓝色的。"), ("一加一等于几", "等于二。")]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """glm-tiny cut to its first two layers."""
    import dataclasses

    from glmkit.checkpoint import load_model, save_model
    from glmkit.model import GLM
    from glmkit.models import embedded_model_path
    src = embedded_model_path()
    if src is None:
        pytest.skip("the embedded glm-tiny is not installed with this checkout")
    m, _ = load_model(src, dtype=torch.float32)
    m2 = GLM(dataclasses.replace(m.config, num_layers=2))
    m2.load_state_dict({k: v for k, v in m.state_dict().items()
                        if not k.startswith("layers.") or int(k.split(".")[1]) < 2})
    out = tmp_path_factory.mktemp("base") / "tiny2"
    save_model(m2, out, source_dir=src)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = [json.dumps({"content": q, "summary": a}, ensure_ascii=False) for q, a in EXAMPLES]
    f.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n", encoding="utf-8")
    return f


def cli(*args, timeout=600, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "glmkit", "finetune", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def losses(run) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(run)[0]}


METHODS = {
    "lora": ["--lr", "1e-2", "--lora-rank", "16", "--lora-dropout", "0", "--steps", "150"],
    "qlora": ["--method", "lora", "--quantize", "int4", "--lr", "1e-2", "--lora-rank", "16", "--lora-dropout", "0",
              "--steps", "150"],
    "ptuning": ["--lr", "1e-1", "--pre-seq-len", "32", "--steps", "300"],
    "full": ["--lr", "3e-3", "--steps", "100"],
}
LIMIT = {"lora": 0.2, "qlora": 0.3, "ptuning": 0.5, "full": 0.05}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_learns_a_few_examples_and_answers_them(method, base, data, tmp_path):
    import glmkit
    extra = METHODS[method]
    args = ["--model", base, "--data", data, "--out", tmp_path / "run", "--batch-size", "3", "--save-every", "1000",
            "--threads", "1", *extra]
    if "--method" not in extra:
        args += ["--method", method]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{data}:3: not JSON" in r.stderr and "3 examples" in r.stderr      # reported, skipped, run goes on
    lo = losses(tmp_path / "run")
    assert lo[max(lo)] < LIMIT[method] < lo[1], (lo[1], lo[max(lo)])
    if method == "full":
        pipe = glmkit.load(tmp_path / "run" / "model")
    else:
        pipe = glmkit.load(base, adapter=tmp_path / "run" / "adapter",
                           quantize="int4" if method == "qlora" else None)
    for q, a in EXAMPLES:
        assert pipe.chat(q, temperature=0, max_tokens=20) == a


def test_resume_after_sigkill_gives_the_same_losses(base, data, tmp_path):
    common = ["--model", base, "--method", "lora", "--data", data, "--steps", "16", "--save-every", "4",
              "--lora-dropout", "0.1", "--lr", "5e-3", "--threads", "1", "--quiet"]
    r = cli(*common, "--out", tmp_path / "ref")
    assert r.returncode == 0, r.stderr[-2000:]
    want = losses(tmp_path / "ref")
    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "glmkit", "finetune", *map(str, common), "--out", str(run)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if (run / "metrics.jsonl").is_file() and 9 in losses(run):
            break
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert max(losses(run)) < 16
    r = cli(*common, "--out", run, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    got = losses(run)
    assert sorted(got) == list(range(1, 17))
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6), (s, got[s], want[s])
    # an existing run is not overwritten by accident
    r = cli(*common, "--out", run)
    assert r.returncode != 0 and "--resume" in r.stderr


def test_two_processes_equal_one(base, data, tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this PyTorch build has no gloo backend")
    common = ["--model", base, "--method", "lora", "--data", data, "--steps", "6", "--lora-dropout", "0",
              "--lr", "5e-3", "--threads", "1", "--quiet", "--save-every", "6"]
    r = cli(*common, "--batch-size", "1", "--grad-accum", "2", "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "glmkit", "finetune", *map(str, common), "--batch-size", "1",
                        "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=2e-5), (s, a[s], b[s])


def test_nothing_usable_stops_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n{\"nothing\": 1}\n", encoding="utf-8")
    r = cli("--model", tmp_path / "no-such-model", "--method", "lora", "--data", bad, "--out", tmp_path / "run")
    assert r.returncode == 1
    assert "no usable examples" in r.stderr and "no-such-model" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_lora_target_is_named(base, data, tmp_path):
    r = cli("--model", base, "--method", "lora", "--data", data, "--out", tmp_path / "run", "--lora-targets",
            "qkv,attention_wrong", "--steps", "1")
    assert r.returncode == 1 and "attention_wrong" in r.stderr


def test_nonfinite_losses_skip_steps_then_stop_keeping_the_last_checkpoint(tmp_path, capsys):
    from glmkit.train.finetune import ExampleBatcher
    from glmkit.train.loop import Trainer, TrainConfig

    class Toy(torch.nn.Module):
        config = type("C", (), {"to_dict": lambda self: {}})()

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 10)

        def forward(self, ids, targets, **kw):        # the loop's model interface: the summed loss
            out = self.emb(ids)
            out = out * float("nan") if bool((ids == 9).any()) else out
            return torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten(), reduction="sum")

    rows = [([1, 2, 3], [-100, 2, 3])] * 3 + [([9, 9, 9], [-100, 9, 9])] * 5
    batcher = ExampleBatcher(rows, shuffle=False)
    # (the fp32 softmax switch needs a GLM's layers: off for this toy module)
    tc = TrainConfig(steps=10, rows=1, lr=1e-2, warmup=0, save_every=1, eval_every=0, fp32_softmax=False)
    tr = Trainer(Toy(), tc, batcher, [], tmp_path, progress=False)
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        tr.run()
    assert tr.step == 3                                  # three good steps, then three skipped
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 3 and "skipped" in (tmp_path / "metrics.jsonl").read_text()
    assert "warning: loss is nan" in capsys.readouterr().err
