"""`glmkit --help`, `glmkit COMMAND --help` and `import glmkit` stay cheap: none of them imports torch or the other
heavy dependencies (checked through sys.modules in a fresh interpreter, not by timing)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glmkit.cli.main import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
       "COLUMNS": "200"}
HEAVY = ["torch", "numpy", "fastapi", "uvicorn", "sentencepiece", "matplotlib", "transformers", "tiktoken",
         "safetensors", "gguf"]

# runs `python -m glmkit ARGS` in this interpreter (as runpy does for -m), then reports what it imported
HELP_PROBE = """
import contextlib, io, json, runpy, sys
argv, heavy = json.loads(sys.argv[1])
sys.argv = ["glmkit", *argv]
out = io.StringIO()
code = None
with contextlib.redirect_stdout(out):
    try:
        runpy.run_module("glmkit", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
print(json.dumps({"code": code, "help": out.getvalue(), "heavy": [m for m in heavy if m in sys.modules]}))
"""


def probe(code: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cmd", [[]] + [[name] for name in COMMANDS], ids=["glmkit"] + list(COMMANDS))
def test_help_does_not_import_heavy_modules(cmd):
    got = probe(HELP_PROBE, json.dumps([[*cmd, "--help"], HEAVY]))
    assert got["code"] in (0, None)
    assert got["help"].startswith(f"usage: glmkit {' '.join(cmd)}".rstrip()) and "examples:" in got["help"]
    assert got["heavy"] == [], f"glmkit {' '.join(cmd)} --help imported {got['heavy']}"


def test_version_does_not_import_torch():
    got = probe(HELP_PROBE, json.dumps([["--version"], HEAVY]))
    assert got["code"] in (0, None) and got["help"].startswith("glmkit ") and got["heavy"] == []


def test_every_cli_module_imports_without_heavy_modules():
    code = """
import importlib, json, pkgutil, sys
import glmkit.cli
names = sorted(m.name for m in pkgutil.iter_modules(glmkit.cli.__path__))
for n in names:
    importlib.import_module("glmkit.cli." + n)
print(json.dumps({"modules": names, "heavy": [m for m in json.loads(sys.argv[1]) if m in sys.modules]}))
"""
    got = probe(code, json.dumps(HEAVY))
    assert {n.replace("-", "_") for n in COMMANDS} <= set(got["modules"])
    assert got["heavy"] == []


def test_import_glmkit_is_lazy_but_load_is_the_real_function():
    code = """
import json, sys
import glmkit
before = "torch" in sys.modules
names = sorted(glmkit.__all__)
listed = all(n in dir(glmkit) for n in ("load", "Pipeline", "ChatResponse", "ToolCall", "__version__"))
load = glmkit.load
import glmkit.pipeline, glmkit.chat_format
print(json.dumps({
    "torch_before": before, "torch_after": "torch" in sys.modules, "all": names, "listed": listed,
    "load": load is glmkit.pipeline.load and glmkit.load is glmkit.pipeline.load,
    "Pipeline": glmkit.Pipeline is glmkit.pipeline.Pipeline,
    "ChatResponse": glmkit.ChatResponse is glmkit.chat_format.ChatResponse,
    "ToolCall": glmkit.ToolCall is glmkit.chat_format.ToolCall,
    "version": glmkit.__version__,
}))
"""
    got = probe(code)
    assert got["torch_before"] is False, "import glmkit imported torch"
    assert got["torch_after"] is True
    assert got["load"] and got["Pipeline"] and got["ChatResponse"] and got["ToolCall"]
    assert set(got["all"]) >= {"load", "Pipeline", "ChatResponse", "ToolCall"} and got["listed"]
    import glmkit
    assert got["version"] == glmkit.__version__


def test_from_glmkit_import_names_and_missing_attribute():
    code = """
import json, sys
from glmkit import ChatResponse, ToolCall
light = "torch" not in sys.modules          # chat_format is pure Python
from glmkit import load, Pipeline
import glmkit
try:
    glmkit.no_such_name
    missing = False
except AttributeError:
    missing = True
print(json.dumps({"light": light, "callable": callable(load) and isinstance(Pipeline, type), "missing": missing,
                  "submodule": glmkit.config.__name__}))
"""
    got = probe(code)
    assert got == {"light": True, "callable": True, "missing": True, "submodule": "glmkit.config"}
