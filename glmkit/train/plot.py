"""Training curves of a run from its metrics.jsonl (written by the training loop, one JSON object a line):

    {"type": "train", "step", "loss", "lr", "tokens", "tok_per_s", "elapsed"}
    {"type": "val", "step", "val_loss", "tokens"}

read_metrics(run_dir) -> (train_rows, val_rows), each sorted by step. A resumed run appends again the steps after
its last checkpoint, so for each (type, step) the last line wins. A line that does not parse (a run killed in
the middle of a write) is reported to `on_error` ("file:line: what") and skipped; other types are ignored.

plot_metrics(run_dir, out=None) -> the PNG written (default DIR/training.png): losses over steps (tokens seen
on the top axis), learning rate below. Needs matplotlib (the train extra), imported only here.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

METRICS = "metrics.jsonl"
NEEDS = {"train": "loss", "val": "val_loss"}          # type -> the value its rows must have


def _metrics_file(run_dir: Union[str, Path]) -> Path:
    p = Path(run_dir).expanduser()
    f = p if p.is_file() else p / METRICS
    if not f.is_file():
        raise ValueError(f"{p}: no {METRICS} here (is it a folder written by `glmkit pretrain`?)")
    return f


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_metrics(run_dir: Union[str, Path], on_error: Optional[Callable[[str], None]] = None
                 ) -> tuple[list[dict], list[dict]]:
    """run_dir (or its metrics.jsonl) -> (train rows, val rows) sorted by step, the last line of each step kept.
    on_error: called with "file:line: what" for each line skipped (default: warnings.warn)."""
    f = _metrics_file(run_dir)
    report = on_error or (lambda msg: warnings.warn(msg, stacklevel=3))
    rows: dict[str, dict[int, dict]] = {"train": {}, "val": {}}
    with open(f, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                report(f"{f}:{n}: not JSON ({e.msg}), skipped")
                continue
            if not isinstance(rec, dict) or "type" not in rec:
                report(f"{f}:{n}: not a metrics record, skipped")
                continue
            if rec["type"] not in NEEDS:                # other record types: not plotted
                continue
            kind = rec["type"]
            step, value = rec.get("step"), rec.get(NEEDS[kind])
            if not (isinstance(step, int) and not isinstance(step, bool)) or not _number(value):
                report(f"{f}:{n}: a {kind} record without an integer step and a numeric {NEEDS[kind]}, skipped")
                continue
            rows[kind][step] = rec
    return ([rows["train"][s] for s in sorted(rows["train"])], [rows["val"][s] for s in sorted(rows["val"])])


def smooth(values: list, window: int) -> list:
    """Centered moving average over `window` points (fewer at the ends): unlike an exponential average it
    does not lag behind the raw curve. Non-finite values are left out of the average."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    s = np.concatenate(([0.0], np.cumsum(np.where(ok, v, 0.0))))
    k = np.concatenate(([0], np.cumsum(ok)))
    i = np.arange(len(v))
    lo, hi = np.maximum(i - window // 2, 0), np.minimum(i + (window - 1) // 2 + 1, len(v))
    n = k[hi] - k[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return list(np.where(n > 0, (s[hi] - s[lo]) / n, np.nan))


def _extended(x, y):
    """Points of a rising curve with one more at each end, far out on the end slopes, so np.interp extrapolates
    (the top axis must map steps left of the first and right of the last logged one)."""
    import numpy as np

    far = 1e6 * (x[-1] - x[0] + 1)
    y0 = y[0] - far * (y[1] - y[0]) / (x[1] - x[0])
    y1 = y[-1] + far * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return np.concatenate(([x[0] - far], x, [x[-1] + far])), np.concatenate(([y0], y, [y1]))


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def plot_metrics(run_dir: Union[str, Path], out: Union[str, Path, None] = None,
                 on_error: Optional[Callable[[str], None]] = None) -> Path:
    """Write the run's training curves as a PNG (default DIR/training.png) -> its path."""
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib (or pip install 'glmkit[train]')") \
            from None
    f = _metrics_file(run_dir)
    train, val = read_metrics(f, on_error)
    if not train and not val:
        raise ValueError(f"{f}: no training or validation records to plot")
    run = f.parent
    out = Path(out).expanduser() if out else run / "training.png"

    # the OO API on an Agg canvas: no pyplot, so the caller's backend and figures are left alone
    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})

    title = run.resolve().name
    facts = []
    if train:
        steps = [r["step"] for r in train]
        loss = [r["loss"] for r in train]
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, marker="o" if len(train) == 1 else None,
                label="training loss")
        if len(train) >= 5:
            ax.plot(steps, smooth(loss, max(3, min(101, len(train) // 25))), color="tab:blue", linewidth=1.8,
                    label="training loss (smoothed)")
        facts.append(f"step {steps[-1]}, loss {_fmt(loss[-1])}")
        lr = [(r["step"], r["lr"]) for r in train if _number(r.get("lr"))]
        if lr:
            ax_lr.plot([s for s, _ in lr], [v for _, v in lr], color="tab:green", linewidth=1.2)
    if val:
        vs = [r["step"] for r in val]
        vl = [r["val_loss"] for r in val]
        ax.plot(vs, vl, color="tab:orange", marker="o", markersize=4, linewidth=1.2, label="validation loss")
        facts.append(f"val {_fmt(vl[-1])} at step {vs[-1]}")
    rows = [r for r in train + val if _number(r.get("tokens"))]
    if rows:
        facts.append(f"{EngFormatter(places=1, sep='')(max(r['tokens'] for r in rows))} tokens")

    # tokens seen on the top axis: steps and tokens rise together, interpolate between the logged points
    pts = sorted({r["step"]: r["tokens"] for r in rows}.items())
    ps = np.array([p for p, _ in pts], dtype=float)
    pt = np.array([t for _, t in pts], dtype=float)
    if len(pts) >= 2 and np.all(np.diff(pt) > 0):        # invertible (a run restarted from scratch is not)
        ps, pt = _extended(ps, pt)
        top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, ps, pt),
                                                   lambda t: np.interp(t, pt, ps)))
        top.xaxis.set_major_formatter(EngFormatter(sep=""))
        top.set_xlabel("tokens seen")

    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(True, alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if not train:
        ax_lr.text(0.5, 0.5, "no training records", transform=ax_lr.transAxes, ha="center", va="center")
    fig.suptitle(f"{title}: " + "; ".join(facts) if facts else title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
