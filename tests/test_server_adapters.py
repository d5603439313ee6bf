"""glmkit serve with two LoRA adapters beside the base: each request's `model` picks one, requests for different
adapters decode together in one batched step (LoRA applied per row, unmerged), and each gets its own greedy
answer: the one of a Pipeline that loaded that adapter (or none) alone."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
import torch

from conftest import GLM, REF, needs_shared
from _server_util import running_server

pytestmark = needs_shared
openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e .[test])")

C3 = REF / "chatglm3-6b"
OFFICIAL = GLM / "adapters-tiny" / "chatglm3-6b-lora"


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """A second LoRA for the same base: random, saved by glmkit in PEFT format."""
    from glmkit.adapters.lora import apply_lora, lora_parameters
    from glmkit.adapters.peft_format import save_peft_lora
    from glmkit.checkpoint import load_model
    m, info = load_model(C3, dtype="float32")
    apply_lora(m, rank=4, alpha=8, targets="qkv,down", seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(m):
            p.normal_(0, 0.3, generator=g)
    out = tmp_path_factory.mktemp("lora") / "second"
    save_peft_lora(m, out, info.layout)
    return out


def test_two_adapters_and_the_base_at_once(second):
    import glmkit
    msgs = [{"role": "user", "content": "你好，介绍一下你自己"}]
    alone = {}
    for name, ad in (("base", None), ("official", OFFICIAL), ("second", second)):
        alone[name] = str(glmkit.load(C3, adapter=ad).chat(msgs, temperature=0, max_tokens=24))
    assert len(set(alone.values())) == 3                       # three different models
    pipe = glmkit.load(C3)
    pipe.add_adapter("official", OFFICIAL)
    pipe.add_adapter("second", second)
    with running_server(pipe=pipe, parallel=4, adapters=("official", "second")) as (base, app):
        steps = []
        stepper = app.engine.stepper
        real = stepper.decode

        def spy(seqs):
            steps.append({s.adapter for s in seqs})
            return real(seqs)
        stepper.decode = spy
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        ids = [m.id for m in client.models.list().data]
        assert ids == [app.fastapi.state.settings.model_id, "official", "second"]
        names = {"base": ids[0], "official": "official", "second": "second"}

        def ask(k):
            r = client.chat.completions.create(model=names[k], messages=msgs, temperature=0, max_tokens=24)
            return k, r.choices[0].message.content, r.model
        with cf.ThreadPoolExecutor(6) as ex:
            got = list(ex.map(ask, ["base", "official", "second"] * 2))
        for k, text, model in got:
            assert text == alone[k], k
            assert model == names[k]
        assert any(len(s) >= 2 for s in steps)                # different adapters in one batched step
        r = httpx.post(base + "/v1/chat/completions", json={"model": "nope", "messages": msgs})
        assert r.status_code == 404 and "official" in r.json()["error"]["message"]


def test_named_adapters_refuse_ptuning(tmp_path):
    import glmkit
    pipe = glmkit.load(REF / "chatglm2-6b")
    with pytest.raises(ValueError, match="P-tuning"):
        pipe.add_adapter("pt", GLM / "adapters-tiny" / "chatglm2-6b-ptuning")
