"""The model on random tiny configs of every generation: prefill + one-token decode steps over the static KV
cache object give the logits of a full forward; rows of a batch at different positions; chunked prefill; prefix
reuse."""
from __future__ import annotations

import pytest
import torch

from glmkit.config import preset
from glmkit.engine import Engine, KVCache
from glmkit.model import GLM
from glmkit.sampling import SamplingParams


def tiny(name: str, **kw) -> GLM:
    base = preset(name)
    cfg = base.replace(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=min(base.num_kv_heads, 4),
                       head_dim=16, ffn_hidden_size=96, vocab_size=200, max_seq_len=128, rope_dim=0, **kw)
    if cfg.family == "chatglm":                     # special ids inside the tiny vocabulary
        cfg = cfg.replace(mask_token_id=190, gmask_token_id=191, smask_token_id=192, sop_token_id=194,
                          eos_token_id=195)
    torch.manual_seed(0)
    m = GLM(cfg).init_weights(std=0.2, seed=0).eval()
    with torch.no_grad():                           # non-trivial norms and biases
        for name_, p in m.named_parameters():
            if "norm" in name_ or name_.endswith("bias"):
                p.normal_(1.0 if "norm" in name_ and name_.endswith("weight") else 0.0, 0.2)
    return m


PRESETS = ["chatglm-6b", "chatglm2-6b", "chatglm3-6b-32k", "glm-4-9b"]


def prompt_for(m: GLM, n=9, mask="gmask"):
    cfg = m.config
    ids = list(range(3, 3 + n))
    if cfg.family == "chatglm":
        if mask == "gmask":
            ids += [cfg.gmask_token_id, cfg.sop_token_id]
        else:                                       # a blank in the middle, filled after <sop>
            ids = ids[:4] + [cfg.mask_token_id] + ids[4:] + [cfg.sop_token_id]
    return ids


@pytest.mark.parametrize("name,mask", [(n, "gmask") for n in PRESETS] + [("chatglm-6b", "mask")])
def test_cache_decode_equals_full_forward(name, mask):
    m = tiny(name)
    prompt = prompt_for(m, mask=mask)
    cont = [40, 41, 42, 43, 44, 45]
    full = m(torch.tensor([prompt + cont]))[0]
    cache = KVCache.for_model(m, 1, 64)
    state = m.sequence_state(torch.tensor([prompt]))
    T = len(prompt)
    out = [m(torch.tensor([prompt]), cache, cache_pos=torch.arange(T)[None], state=state, kv_len=T)[0]]
    for k, tok in enumerate(cont):
        p = T + k
        out.append(m(torch.tensor([[tok]]), cache, cache_pos=torch.tensor([[p]]), state=state, kv_len=p + 1)[0])
    stepped = torch.cat(out)
    assert (stepped - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", PRESETS)
def test_batch_rows_at_different_positions(name):
    """Two sequences of different lengths decode in one forward; each row equals its single-row run."""
    m = tiny(name)
    a, b = prompt_for(m, n=5), prompt_for(m, n=11)
    cache = KVCache.for_model(m, 2, 64)
    states = []
    for row, p in enumerate((a, b)):
        # prefill row by row (the server does the same), through a one-row view of the cache
        st = m.sequence_state(torch.tensor([p]))
        states.append(st)
    from glmkit.model import SeqState
    both = SeqState(torch.cat([s.ctx_len for s in states]), torch.cat([s.mask_pos for s in states]))
    # pad the shorter prompt on the right and prefill both rows in one forward; padding positions are
    # beyond each row's length and overwritten by the next step
    L = max(len(a), len(b))
    ids = torch.tensor([a + [0] * (L - len(a)), b + [0] * (L - len(b))])
    pos = torch.arange(L).expand(2, L)
    m(ids, cache, cache_pos=pos, state=both, kv_len=L)
    nxt = torch.tensor([[50], [60]])
    pos = torch.tensor([[len(a)], [len(b)]])
    batched = m(nxt, cache, cache_pos=pos, state=both, kv_len=L + 1)[:, 0]
    for row, (p, t) in enumerate(((a, 50), (b, 60))):
        ref = m(torch.tensor([p + [t]]))[0, -1]
        assert (batched[row] - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["chatglm2-6b", "glm-4-9b"])
def test_chunked_prefill_and_prefix_reuse(name):
    m = tiny(name)
    g = Engine(m, max_seq=100, prefill_chunk=4)
    p = list(range(3, 30))
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    first = list(g.generate(p, greedy))
    g2 = Engine(m, max_seq=100, prefill_chunk=1000)
    assert list(g2.generate(p, greedy)) == first
    # the next turn shares the prompt and the answer: only the new part is prefilled
    turn2 = p + first + [7, 8, 9]
    s = g2.generate(turn2, greedy)
    out = list(s)
    assert s.stats.reused_tokens == len(p) + len(first) - 1
    fresh = Engine(m, max_seq=100)
    assert list(fresh.generate(turn2, greedy)) == out


def test_chatglm6b_positions_follow_the_official_rules():
    m = tiny("chatglm-6b")
    c = m.config
    ids = torch.tensor([[5, 6, c.mask_token_id, 7, c.gmask_token_id, c.sop_token_id, 9, 9]])
    st = m.sequence_state(ids)
    assert st.ctx_len.tolist() == [5] and st.mask_pos.tolist() == [4]      # [gMASK] wins over [MASK]
    ids2 = torch.tensor([[5, 6, c.mask_token_id, 7, c.sop_token_id]])
    assert m.sequence_state(ids2).mask_pos.tolist() == [2]
    # no <sop>: all of it is context (bidirectional), as the official tokenizer's padding code assumes
    assert m.sequence_state(torch.tensor([[5, 6, 7]])).ctx_len.tolist() == [3]
    mask = m._mask_for(torch.arange(8)[None], torch.arange(8)[None], st)[0, 0]
    assert mask[0, 4] and not mask[0, 5] and mask[6, 5] and not mask[5, 6]


def test_cache_limits():
    m = tiny("chatglm3-6b")
    with pytest.raises(ValueError, match="exceeds"):
        KVCache.for_model(m, 1, 1000)
    with pytest.raises(ValueError, match="cache_pos"):
        m(torch.tensor([[1, 2]]), KVCache.for_model(m, 1, 64))


@pytest.mark.parametrize("head", ["linear-trained", "linear-frozen", "int8", "lora"])
def test_lm_loss_equals_cross_entropy_of_the_logits_with_the_same_gradients(head):
    """forward(targets=) (chunks of rows, gradients made in the forward pass for a plain head, recomputed for
    others) gives autograd's loss and gradients over the whole logits, with tiny chunks forcing several."""
    import torch.nn.functional as F
    from glmkit.adapters.lora import apply_lora
    from glmkit.quant import quantize_model
    m = tiny("chatglm3-6b")
    if head == "int8":
        quantize_model(m, "int8")
    if head == "lora":
        m.requires_grad_(False)
        apply_lora(m, 4, 8.0, 0.0, "qkv,output", seed=0)
        for n, p in m.named_parameters():
            if "lora_B" in n or ".B." in n:
                torch.nn.init.normal_(p, std=0.1)      # a fresh LoRA's B is zero: make its gradient path visible
    if head == "linear-frozen":
        m.output.weight.requires_grad_(False)
    m.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, m.config.vocab_size, (2, 17), generator=g)
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    targets[0, :6] = -100                                   # a prompt without loss
    params = [p for p in m.parameters() if p.requires_grad]
    ref = F.cross_entropy(m(ids).float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    x = m.blocks(m.embed(ids), *m.attention_inputs(ids)[:2])
    got = m.lm_loss(x, targets, chunk_bytes=4 * m.config.vocab_size * 5)      # chunks of 5 rows
    got_grads = torch.autograd.grad(got, params)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert len(params) > 0
    for a, b in zip(got_grads, ref_grads):                 # fp32 summation order differs: relative to the scale
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-7
    assert m(ids, targets=targets).item() == pytest.approx(ref.item(), rel=1e-5)
    with torch.no_grad():
        assert m(ids, targets=targets).item() == pytest.approx(ref.item(), rel=1e-5)
