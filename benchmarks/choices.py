"""Multiple-choice scoring: one packed forward (Pipeline.score_choices) against one forward per choice.

    python benchmarks/choices.py [--layers 24 --hidden 1024 --heads 16] [--choices 4] [--repeat 5] [--threads 2]

A random original GLM of the glm-large-chinese shape (24 layers, hidden 1024, 16 heads: 335M parameters, fp32) by
default, with the real cog-pretrain tokenizer of ../shared/glm/glm-original-tiny; a cloze context of ~30 tokens
and `--choices` Chinese answers of 2-9 tokens. Prints the median seconds of each way (after one warm-up), their
ratio and the largest score difference between them (the packing changes no score).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmkit.config import ModelConfig  # noqa: E402
from glmkit.model import GLM  # noqa: E402
from glmkit.pipeline import Pipeline  # noqa: E402
from glmkit.tokenizer import load_tokenizer  # noqa: E402

TOK = ROOT.parent / "shared" / "glm" / "glm-original-tiny" / "glm-large-chinese"
CONTEXT = "清华大学是中国著名的高等学府，坐落于[MASK]西北郊风景秀丽的清华园，是中国高层次人才培养和科学技术研究的基地。"
CHOICES = ["北京", "上海交通大学的校园", "广州", "中国的首都北京市海淀区", "南京", "西安古城", "杭州西湖边", "成都"]


def one_at_a_time(pipe, context, choices):
    tok, out = pipe.tokenizer, []
    for c in choices:
        ch = tok.encode_span(c)
        ids = tok.encode_for_generation(context) + ch[:-1]
        with torch.inference_mode():
            lp = torch.log_softmax(pipe.model(torch.tensor([ids]))[0].float(), -1)
        first = len(ids) - len(ch)
        out.append(sum(float(lp[first + j, t]) for j, t in enumerate(ch)))
    return out


def timed(fn, repeat):
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = load_tokenizer(TOK, "glm")
    sp = tok.special
    h = a.hidden
    cfg = ModelConfig(family="glm", vocab_size=50048, hidden_size=h, num_layers=a.layers, num_heads=a.heads,
                      num_kv_heads=a.heads, head_dim=h // a.heads, ffn_hidden_size=4 * h, max_seq_len=1025,
                      norm="layernorm", activation="gelu_erf", out_bias=True, mlp_bias=True, prefix_lm=True,
                      pos_embedding="learned_2d", first_mask_any=True, tie_word_embeddings=True,
                      mask_token_id=sp["[MASK]"], gmask_token_id=sp["[gMASK]"], smask_token_id=sp["[sMASK]"],
                      sop_token_id=sp["<|startofpiece|>"], eos_token_id=sp["<|endofpiece|>"],
                      pad_token_id=sp["<|endoftext|>"])
    model = GLM(cfg).init_weights(seed=0).eval()
    pipe = Pipeline(model, tok, ctx=1024)
    choices = CHOICES[:a.choices]
    t_pack, s_pack = timed(lambda: pipe.score_choices(CONTEXT, choices), a.repeat)
    t_one, s_one = timed(lambda: one_at_a_time(pipe, CONTEXT, choices), a.repeat)
    diff = max(abs(x - y) for x, y in zip(s_pack, s_one))
    print(f"model: {cfg.num_params() / 1e6:.0f}M parameters, {a.layers} layers, hidden {h}; context "
          f"{len(tok.encode(CONTEXT))} tokens, {len(choices)} choices of "
          f"{sum(len(tok.encode_span(c)) for c in choices)} tokens; {a.threads} threads")
    print(f"packed (one forward): {t_pack * 1000:.1f} ms   one forward per choice: {t_one * 1000:.1f} ms")
    print(f"choices_speedup={t_one / t_pack:.2f} max_score_diff={diff:.2e}")


if __name__ == "__main__":
    main()
