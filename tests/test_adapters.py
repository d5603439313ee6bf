"""Adapters through the user-facing paths: every case of ../shared/glm/adapters-tiny that has a tokenizer loaded with
glmkit.load(base, adapter=DIR) gives the official logits (last two positions, 1e-4), the argmax at every position
and the 12 greedy tokens, with the KV cache (the Pipeline's engine) and by full recomputation; LoRA cases the same
after `glmkit merge`; P-tuning merge and folders of neither kind are refused with a message."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import GLM, needs_shared
from glmkit.sampling import SamplingParams

pytestmark = needs_shared
AD = GLM / "adapters-tiny"


def _cases():
    if not (AD / "expected.json").is_file():
        return []
    exp = json.loads((AD / "expected.json").read_text())
    return [(name, case) for name, case in exp.items() if (AD / case["base"] / "tokenizer_config.json").is_file()
            or any((AD / case["base"] / f).is_file() for f in ("ice_text.model", "tokenizer.model"))]


CASES = _cases()


def check(pipe, case):
    for c in case["cases"]:
        ids = c["input_ids"]
        logits = pipe.logits(ids).float()
        want = torch.load(AD / c["logits_file"], weights_only=True)
        assert (logits[-2:] - want).abs().max().item() <= 1e-4
        assert logits.argmax(-1).tolist() == c["argmax_per_position"]
        pipe.engine.reset()
        got = list(pipe.engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=12)))
        assert got == c["greedy_12"]
        seq = list(ids)
        for _ in range(12):
            seq.append(int(pipe.logits(seq)[-1].argmax()))
        assert seq[len(ids):] == c["greedy_12"]


@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_glmkit_load_with_adapter_reproduces_the_official_stack(name, case):
    import glmkit
    pipe = glmkit.load(AD / case["base"], dtype="float32", adapter=AD / case["adapter"])
    assert pipe.adapter == AD / case["adapter"]
    check(pipe, case)


@pytest.mark.parametrize("name,case", [c for c in CASES if c[1]["method"] == "lora"],
                         ids=[n for n, c in CASES if c["method"] == "lora"])
def test_merged_lora_reproduces_it_too(name, case, tmp_path):
    import glmkit
    from glmkit.cli.main import main
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(AD / case["base"]), "--adapter", str(AD / case["adapter"]),
                 "--out", str(out), "--dtype", "float32"]) == 0
    pipe = glmkit.load(out, dtype="float32")
    assert not any(".adapters." in k for k in pipe.model.state_dict())
    check(pipe, case)


def test_ptuning_merge_and_unknown_folders_are_refused(tmp_path, capsys):
    import glmkit
    from glmkit.cli.main import main
    base = AD / "../reference-tiny/chatglm2-6b"
    assert main(["merge", "--model", str(base), "--adapter", str(AD / "chatglm2-6b-ptuning"),
                 "--out", str(tmp_path / "x")]) == 1
    assert "cannot be merged" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="neither a PEFT LoRA folder"):
        glmkit.load(base, adapter=tmp_path / "junk")
    with pytest.raises(ValueError, match="made for another base"):
        glmkit.load(AD / "../reference-tiny/chatglm3-6b", adapter=AD / "chatglm-6b-ptuning")
    from glmkit.cli.main import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for cmd in ("chat", "generate", "infill", "serve", "eval"):
        assert "--adapter" in sub.choices[cmd].format_help(), cmd
