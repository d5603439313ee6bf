"""glmkit plot: training curves of a `glmkit pretrain` run as a PNG."""
from __future__ import annotations

import sys

EXAMPLES = """examples:
  glmkit plot runs/poems            # writes runs/poems/training.png
  glmkit plot runs/poems --out ~/poems-loss.png

Reads DIR/metrics.jsonl (a resumed run's repeated steps: the last line counts; lines that do not parse are
skipped with a warning). Needs matplotlib: pip install 'glmkit[train]'."""


def add_arguments(p):
    p.add_argument("dir", metavar="DIR", help="the run's output folder (holding metrics.jsonl), or the file itself")
    p.add_argument("--out", "-o", metavar="PNG", default=None,
                   help="where to write the image (default DIR/training.png)")


def run(args) -> int:
    from ..train.plot import plot_metrics

    path = plot_metrics(args.dir, args.out,
                        on_error=lambda msg: print(f"glmkit plot: warning: {msg}", file=sys.stderr))
    print(path)
    return 0
