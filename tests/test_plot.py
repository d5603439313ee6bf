"""`glmkit plot DIR`: a run's metrics.jsonl (resumed steps, a torn line) -> training.png."""
from __future__ import annotations

import json
import struct

import pytest

from glmkit.train.plot import read_metrics

pytest.importorskip("matplotlib", reason="matplotlib (the train extra) is not installed")


def train(step, loss, lr=1e-3):
    return {"type": "train", "step": step, "loss": loss, "lr": lr, "tokens": step * 1000, "tok_per_s": 5e3,
            "elapsed": step * 0.5}


def val(step, loss):
    return {"type": "val", "step": step, "val_loss": loss, "tokens": step * 1000}


def write_run(run):
    """Steps 1..30, validation every 10; killed in the middle of a line at 31, resumed from step 20 with other
    losses (the last line of a step counts)."""
    run.mkdir(parents=True)
    lines = [json.dumps(train(s, 10.0 - s * 0.1, lr=1e-3 * min(1, s / 5))) for s in range(1, 31)]
    lines[9:9] = [json.dumps(val(10, 9.5))]
    lines[20:20] = [json.dumps(val(20, 8.5))]
    lines.append(json.dumps(val(30, 7.5)))
    lines.append('{"type": "train", "step": 31, "lo')                     # torn write of the killed run
    lines += [json.dumps(train(s, 5.0 - s * 0.01)) for s in range(21, 41)]
    lines.append(json.dumps(val(30, 4.5)))
    lines.append("")                                                       # blank: ignored
    lines.append(json.dumps({"type": "event", "step": 40, "what": "saved"}))   # other types: ignored
    lines.append(json.dumps({"type": "train", "step": "x", "loss": 1.0}))  # no integer step: skipped
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run


def test_read_metrics_keeps_the_last_line_of_each_step(tmp_path):
    run = write_run(tmp_path / "run")
    errors = []
    tr, va = read_metrics(run, on_error=errors.append)
    assert [r["step"] for r in tr] == list(range(1, 41))
    assert tr[9]["loss"] == pytest.approx(9.0)                             # step 10: before the resume
    assert tr[20]["loss"] == pytest.approx(5.0 - 0.21)                     # step 21: the resumed run's
    assert [(r["step"], r["val_loss"]) for r in va] == [(10, 9.5), (20, 8.5), (30, 4.5)]
    f = run / "metrics.jsonl"
    n_torn = f.read_text().splitlines().index('{"type": "train", "step": 31, "lo') + 1
    assert len(errors) == 2
    assert errors[0].startswith(f"{f}:{n_torn}: ") and "not JSON" in errors[0]
    assert "integer step" in errors[1]
    with pytest.warns(UserWarning) as caught:
        assert read_metrics(f) == (tr, va)                                 # the file itself is fine too
    assert [str(w.message) for w in caught] == errors


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def test_plot_command_writes_the_png(tmp_path, capsys):
    from glmkit.cli.main import main

    run = write_run(tmp_path / "my-run")
    assert main(["plot", str(run)]) == 0
    out, err = capsys.readouterr()
    png = run / "training.png"
    assert out.strip() == str(png)
    (w, h), nbytes = png_size(png)
    assert w >= 600 and h >= 400 and nbytes > 20_000
    assert "metrics.jsonl:" in err and "warning" in err

    other = tmp_path / "elsewhere" / "curves.png"
    assert main(["plot", str(run), "--out", str(other)]) == 0
    assert capsys.readouterr().out.strip() == str(other) and png_size(other)[1] > 20_000


def test_plot_errors(tmp_path, capsys):
    from glmkit.cli.main import main

    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path / "empty")]) == 1
    assert "no training or validation records" in capsys.readouterr().err
