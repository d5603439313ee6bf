"""CodeGeeX2-6B: the ChatGLM2-6B architecture and tokenizer in a folder named as THUDM publishes it
(config.json / tokenizer_config.json naming THUDM/codegeex2-6b). It loads as ChatGLM2 (the same logits as the
reference ChatGLM2 checkpoint it is made from) and completes a `# language: Python` prompt as the official
README does it: tokenizer.encode(prompt) ([gMASK] sop + the prompt), greedy (top_k=1)."""
from __future__ import annotations

import json
import shutil

import torch

import glmkit
from glmkit.config import preset

from conftest import REF, needs_shared, ref_pipeline

pytestmark = needs_shared
PROMPT = "# language: Python\n# write a bubble sort function\n"


def codegeex_folder(tmp_path):
    d = tmp_path / "cg"                                  # a folder name that says nothing
    shutil.copytree(REF / "chatglm2-6b", d)
    for name, key in (("config.json", "_name_or_path"), ("tokenizer_config.json", "name_or_path")):
        cfg = json.loads((d / name).read_text())
        (d / name).write_text(json.dumps({**cfg, key: "THUDM/codegeex2-6b"}))
    return d


def test_codegeex2_loads_as_chatglm2_and_completes_code(tmp_path):
    pipe = glmkit.load(codegeex_folder(tmp_path), dtype="float32")
    assert pipe.config.family == "chatglm2" and pipe.config.name == "THUDM/codegeex2-6b"
    ids = pipe.tokenizer.encode(PROMPT)
    ref = ref_pipeline("chatglm2-6b")
    assert ids[:2] == [ref.tokenizer.special["[gMASK]"], ref.tokenizer.special["sop"]]
    assert ids == ref.tokenizer.encode(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(torch.tensor([ids])), ref.model(torch.tensor([ids])), atol=1e-5, rtol=0)
    out = pipe.generate(PROMPT, max_new_tokens=8, temperature=0)
    seq = list(ids)                                      # greedy by hand, full recomputation
    for _ in range(8):
        with torch.no_grad():
            t = int(pipe.model(torch.tensor([seq]))[0, -1].argmax())
        if t == pipe.tokenizer.eos_id:
            break
        seq.append(t)
    assert out == pipe.tokenizer.decode(seq[len(ids):])


def test_codegeex2_preset_is_the_chatglm2_architecture():
    a, b = preset("codegeex2-6b"), preset("chatglm2-6b")
    assert a.family == "chatglm2" and a.max_seq_len == 8192
    assert (a.hidden_size, a.num_layers, a.num_kv_heads, a.vocab_size) == (b.hidden_size, b.num_layers,
                                                                          b.num_kv_heads, b.vocab_size)
