"""The README's promises that a script can check."""
from __future__ import annotations

import re

from conftest import ROOT


def quick_start():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    cmds = quick_start()
    assert len(cmds) == 2
    assert "glmkit chat" in cmds[0]
    assert "pytest" in cmds[1]
    assert cmds[1] in (ROOT / ".ci" / "run").read_text()


def test_every_command_is_in_the_readme():
    from glmkit.cli.main import COMMANDS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in COMMANDS:
        assert re.search(rf"glmkit {name}\b", text), name
