"""The local model store ($GLMKIT_MODELS): `glmkit models` on a store with two models and an adapter, --model /
--adapter NAME resolved there before paths, --out NAME of quantize / merge written there, and GET /v1/models."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import GLM, REF, needs_shared
from glmkit import store

GLMKIT = [sys.executable, "-m", "glmkit"]
pytestmark = needs_shared


def in_process(root: Path, *args, cwd: Path) -> int:
    """glmkit ARGS in this process (as test_adapters runs merge), with $GLMKIT_MODELS=root, from `cwd`."""
    from glmkit.cli.main import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLMKIT_MODELS", str(root))
        mp.chdir(cwd)
        return main(list(map(str, args)))


def cli(root: Path, *args, cwd=None):
    """glmkit ARGS in a fresh process."""
    env = {**os.environ, "GLMKIT_MODELS": str(root), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(GLMKIT + list(map(str, args)), capture_output=True, text=True, env=env, timeout=300,
                          cwd=cwd)


def disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A store holding the official-layout ChatGLM3 reference model "c3", a LoRA made for it ("c3-lora", its
    base recorded as glmkit finetune records it: the base's path), and "c3-int8" written by glmkit quantize
    --out NAME from --model NAME."""
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(REF / "chatglm3-6b", root / "c3")
    lora = root / "c3-lora"
    shutil.copytree(GLM / "adapters-tiny" / "chatglm3-6b-lora", lora)
    os.chmod(lora, 0o755)
    for f in lora.iterdir():
        os.chmod(f, 0o644)
    conf = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": str(root / "c3")}))
    assert in_process(root, "quantize", "--model", "c3", "--bits", "8", "--out", "c3-int8", cwd=root.parent) == 0
    assert (root / "c3-int8" / "config.json").is_file() and not (root.parent / "c3-int8").exists()
    return root


def test_glmkit_models_lists_the_store(root, capsys):
    r = cli(root, "models", "--json")
    assert r.returncode == 0, r.stderr
    got = {e["name"]: e for e in map(json.loads, r.stdout.splitlines())}
    assert sorted(got) == ["c3", "c3-int8", "c3-lora"]
    c3, q8, lora = got["c3"], got["c3-int8"], got["c3-lora"]
    assert (c3["kind"], c3["generation"], c3["quantization"], c3["adapters"]) == ("model", "chatglm3", None, ["c3-lora"])
    assert (q8["kind"], q8["generation"], q8["quantization"], q8["adapters"]) == ("model", "chatglm3", "int8", [])
    assert (lora["kind"], lora["base"], lora["generation"]) == ("adapter", str(root / "c3"), "chatglm3")
    for name, e in got.items():
        assert e["size_bytes"] == disk(root / name) and e["path"] == str(root / name)
    capsys.readouterr()
    assert in_process(root, "models", cwd=root) == 0
    table = capsys.readouterr().out
    row = next(ln for ln in table.splitlines() if ln.startswith("c3-int8 "))
    assert "chatglm3" in row and "int8" in row and "MB" in row
    assert "c3-lora" in next(ln for ln in table.splitlines() if ln.startswith("c3 "))


def test_model_and_adapter_names_resolve_in_the_store(root, tmp_path, capsys):
    # from a folder where no "c3" exists: the names can only come from the store
    r = cli(root, "generate", "--model", "c3", "--adapter", "c3-lora", "--prompt", "你好", "-n", "6", "-t", "0",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import glmkit
    pipe = glmkit.load(root / "c3", adapter=root / "c3-lora")
    assert r.stdout.rstrip("\n") == pipe.generate("你好", max_new_tokens=6, temperature=0)
    capsys.readouterr()
    assert in_process(root, "chat", "--model", "no-such-model", cwd=tmp_path) == 1
    err = capsys.readouterr().err
    assert "no model named 'no-such-model' in the store" in err and str(root) in err


def test_a_path_is_still_a_path(root, tmp_path, monkeypatch):
    monkeypatch.setenv("GLMKIT_MODELS", str(root))
    assert store.resolve("c3") == str(root / "c3")
    assert store.resolve(str(REF / "chatglm3-6b")) == str(REF / "chatglm3-6b")   # a slash: never the store
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-model").mkdir()
    assert store.resolve("local-model") == "local-model"                        # not in the store: the folder
    assert store.out_path("run-x") == root / "run-x" and store.out_path("runs/x") == Path("runs/x")
    monkeypatch.delenv("GLMKIT_MODELS")
    assert store.models_dir() == Path("~/.glmkit/models").expanduser()


def test_finetune_run_folder_is_an_entry(tmp_path, monkeypatch):
    """What glmkit finetune --out NAME leaves (NAME/adapter + run.json) is listed and resolved as its adapter."""
    root = tmp_path / "s"
    run = root / "ads"
    shutil.copytree(GLM / "adapters-tiny" / "chatglm3-6b-lora", run / "adapter")
    (run / "run.json").write_text(json.dumps({"args": {"model": str(REF / "chatglm3-6b")}}))
    monkeypatch.setenv("GLMKIT_MODELS", str(root))
    [e] = store.list_models()
    assert (e.name, e.kind, e.path) == ("ads", "adapter", str(run / "adapter"))
    assert store.resolve("ads", "adapter") == str(run / "adapter")
    (root / "half-copied").mkdir()                                  # neither a model nor an adapter: said so
    with pytest.raises(store.StoreError, match="holds neither a model"):
        store.resolve("half-copied")
    assert [e.name for e in store.list_models()] == ["ads"]


def test_merge_out_name_and_v1_models(root):
    assert in_process(root, "merge", "--model", "c3", "--adapter", "c3-lora", "--out", "c3-merged",
                      cwd=root.parent) == 0
    assert (root / "c3-merged" / "config.json").is_file() and not (root.parent / "c3-merged").exists()
    from _server_util import running_server

    import glmkit
    pipe = glmkit.load(root / "c3-int8")
    with running_server(pipe=pipe, model_id="c3-int8") as (base, _):
        data = httpx.get(base + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["c3-int8"]
    assert (data[0]["generation"], data[0]["quantization"]) == ("chatglm3", "int8")
    assert data[0]["size_bytes"] == disk(root / "c3-int8")
    assert store.held("c3-int8", root / "c3-int8")[0]["quantization"] == "int8"
