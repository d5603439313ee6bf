"""glmkit.eval and `glmkit eval`: ROUGE-1/2/L and BLEU-4 equal the numbers of ChatGLM's P-tuning compute_metrics
(the official ones in ../shared/glm/metrics-sample.json, and the official recipe computed here with jieba,
rouge_chinese and nltk on other pairs); empty texts score 0; data files are read with their problems reported
as file:line; greedy answers equal pipe.chat()'s whatever the batch size; nothing usable fails before the model
is loaded."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from conftest import GLM, REF, ROOT, SHARED, needs_shared, ref_pipeline

jieba = pytest.importorskip("jieba", reason="jieba (glmkit eval's dependency) is not installed")
rouge_chinese = pytest.importorskip("rouge_chinese", reason="rouge-chinese (glmkit eval's dependency) is not installed")
bleu_score = pytest.importorskip("nltk.translate.bleu_score", reason="nltk (glmkit eval's dependency) is not installed")

from glmkit.cli.main import main  # noqa: E402
from glmkit.eval import METRICS, DataError, read_dataset, rouge_bleu, sample_scores, score_pair  # noqa: E402

SAMPLE = GLM / "metrics-sample.json"
ADVERTISEGEN = SHARED / "corpora" / "advertisegen" / "dev.json"
needs_sample = pytest.mark.skipif(not SAMPLE.is_file(), reason=f"{SAMPLE} (official metric numbers) is absent")
needs_advertisegen = pytest.mark.skipif(not ADVERTISEGEN.is_file(), reason=f"{ADVERTISEGEN} is absent")


def official_compute_metrics(preds, labels) -> tuple[list[dict], dict]:
    """ChatGLM-6B ptuning/main.py compute_metrics on decoded texts, as written there (no empty-text guard)."""
    import numpy as np

    per = []
    for pred, label in zip(preds, labels):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        rouge = rouge_chinese.Rouge()
        scores = rouge.get_scores(" ".join(hypothesis), " ".join(reference))
        d = {k: round(v["f"] * 100, 4) for k, v in scores[0].items()}
        bleu = bleu_score.sentence_bleu([list(label)], list(pred),
                                        smoothing_function=bleu_score.SmoothingFunction().method3)
        d["bleu-4"] = round(bleu * 100, 4)
        per.append(d)
    return per, {k: float(np.mean([d[k] for d in per])) for k in METRICS}


# --- the official numbers ------------------------------------------------------------------------------------

@needs_sample
def test_official_numbers_of_metrics_sample():
    doc = json.loads(SAMPLE.read_text(encoding="utf-8"))
    pairs = doc["pairs"]
    preds, refs = [p["prediction"] for p in pairs], [p["reference"] for p in pairs]
    per = sample_scores(preds, refs)
    for p, got in zip(pairs, per):
        for k in METRICS:
            assert got[k] == pytest.approx(p[k], abs=1e-3), (p["kind"], k, p["prediction"][:30])
    means = rouge_bleu(preds, refs)
    assert set(means) == set(METRICS)
    for k in METRICS:
        assert means[k] == pytest.approx(doc["mean"][k], abs=1e-3), k
    assert {p["kind"] for p in pairs} >= {"empty_prediction", "empty_reference", "punctuation_only"}


def _perturbed_pairs() -> list[tuple[str, str]]:
    """Real AdvertiseGen summaries (not those of metrics-sample.json) against perturbed ones, English and mixed
    text, and short, punctuation-only and multi-line edge cases."""
    lines = ADVERTISEGEN.read_text(encoding="utf-8").splitlines()
    texts = [json.loads(s)["summary"] for s in lines[1000:1012]]
    rnd = random.Random(7)
    pairs = []
    for i, t in enumerate(texts):
        kind = i % 6
        if kind == 0:
            pairs.append((t, t))
        elif kind == 1:
            pairs.append((t[: len(t) * 3 // 5], t))
        elif kind == 2:
            parts = t.replace("。", "，").split("，")
            rnd.shuffle(parts)
            pairs.append(("，".join(parts), t))
        elif kind == 3:
            s = list(t)
            for j in range(0, len(s), 7):
                s[j] = rnd.choice("的了很款衣裙")
            pairs.append(("".join(s), t))
        elif kind == 4:
            pairs.append((texts[(i + 1) % len(texts)], t))
        else:
            pairs.append((t[:20] + t[10:20] * 4, t))
    pairs += [
        ("The quick brown fox jumps over the lazy dog.", "A quick brown dog jumps over the lazy fox."),
        ("Evaluation uses ROUGE and BLEU scores", "Evaluation uses BLEU and ROUGE scores, as usual."),
        ("这款T恤采用cotton面料，soft又透气。", "这款T恤采用纯棉面料，柔软又透气，design简约。"),
        (texts[0][:15] + " with an English tail, and more words.", texts[0]),
        ("好", "好"),
        ("好看", "很好看的裙子"),
        ("！！", texts[1]),
        ("第一句。\n第二句！\n\n第三句？", "第一句。第二句！第三句。"),
        ("tab\tseparated\u3000text", "tab separated text"),
        ("……省略号……真的", "省略号真的"),
    ]
    return pairs


@needs_advertisegen
def test_official_recipe_on_other_pairs():
    pairs = _perturbed_pairs()
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    want_per, want_mean = official_compute_metrics(preds, refs)
    got_per = sample_scores(preds, refs)
    for (p, _), want, got in zip(pairs, want_per, got_per):
        assert got == want, p[:30]
    got_mean = rouge_bleu(preds, refs)
    for k in METRICS:
        assert got_mean[k] == pytest.approx(want_mean[k], abs=1e-9)
    # the pairs are not trivial: scores spread over the range
    assert len({d["rouge-l"] for d in got_per}) > 10 and min(d["bleu-4"] for d in got_per) < 5


def test_empty_prediction_or_reference_scores_zero():
    zero = dict.fromkeys(METRICS, 0.0)
    for pred, ref in [("", "这款连衣裙很显瘦"), ("这款连衣裙很显瘦", ""), ("", ""), ("  \n\t", "这款"),
                      ("这款", "\u3000")]:
        assert score_pair(pred, ref) == zero, (pred, ref)
    means = rouge_bleu(["这款连衣裙很显瘦", ""], ["这款连衣裙很显瘦", "参考"])
    assert means == {"rouge-1": 50.0, "rouge-2": 50.0, "rouge-l": 50.0, "bleu-4": 50.0}


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        rouge_bleu([], [])
    with pytest.raises(TypeError, match="lists of strings"):
        rouge_bleu("abc", "abd")
    with pytest.raises(TypeError, match="pair 1: the prediction must be a str, not NoneType"):
        rouge_bleu(["a", None], ["a", "b"])


def test_imports_stay_lazy_and_jieba_is_quiet_offline(tmp_path):
    """import glmkit.eval / glmkit.cli.eval loads none of the metric libraries (nor torch); the first score
    builds jieba's dictionary from its own package into a fresh temporary directory without a log line."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    code = """
import json, sys
import glmkit.eval, glmkit.cli.eval
heavy = [m for m in ("jieba", "nltk", "rouge_chinese", "torch") if m in sys.modules]
from glmkit.eval import rouge_bleu
print(json.dumps({"heavy": heavy, "scores": rouge_bleu(["这款衬衫很好看"], ["这款衬衫好看"])}))
"""
    for _ in range(2):                              # building the cache, then reading it
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["heavy"] == []
        assert got["scores"]["rouge-1"] > 50
        assert r.stderr == "", r.stderr
        assert (tmp_path / "jieba.cache").is_file()


# --- reading data --------------------------------------------------------------------------------------------

def test_read_jsonl_reports_bad_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([
        json.dumps({"q": "问题一", "a": "回答一"}, ensure_ascii=False),
        '{"q": "broken',
        "",
        json.dumps({"q": "问题二"}, ensure_ascii=False),
        json.dumps(["not", "an", "object"]),
        json.dumps({"q": "", "a": "空问题"}, ensure_ascii=False),
        json.dumps({"q": 3, "a": "数字"}, ensure_ascii=False),
        json.dumps({"q": "问题三", "a": "回答三", "h": [["早", "早上好"]]}, ensure_ascii=False),
        json.dumps({"q": "问题四", "a": "回答四", "h": "not pairs"}, ensure_ascii=False),
    ]) + "\n", encoding="utf-8")
    ds = read_dataset(f, "q", "a", history_column="h")
    assert [(e.prompt, e.where) for e in ds.examples] == [("问题一", f"{f}:1"), ("问题三", f"{f}:8")]
    assert ds.examples[1].history == [("早", "早上好")]
    assert ds.examples[1].messages() == [{"role": "user", "content": "早"},
                                         {"role": "assistant", "content": "早上好"},
                                         {"role": "user", "content": "问题三"}]
    assert [p.split(": ", 1)[0] for p in ds.problems] == [f"{f}:{n}" for n in (2, 4, 5, 6, 7, 9)]
    assert "not valid JSON" in ds.problems[0] and "no 'a' column" in ds.problems[1]
    assert "not a JSON object" in ds.problems[2] and "'q' is empty" in ds.problems[3]
    assert "'q' is a number, not a string" in ds.problems[4] and "[question, answer] pairs" in ds.problems[5]
    assert [e.prompt for e in read_dataset(f, "q", "a", limit=1).examples] == ["问题一"]


def test_read_json_list_with_lines(tmp_path):
    f = tmp_path / "d.json"
    rows = [{"content": "类型#裙", "summary": "一条裙子"}, {"content": "类型#上衣"},
            {"content": "类型#裤", "summary": "裤子"}]
    f.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    ds = read_dataset(f, "content", "summary")
    assert [e.response for e in ds.examples] == ["一条裙子", "裤子"]
    assert [e.where for e in ds.examples] == [f"{f}:2", f"{f}:9"]
    assert ds.problems == [f"{f}:6: no 'summary' column (its columns: 'content')"]
    f.write_text('[{"content": "a", "summary": "b"},\n {"content": ]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json:2:14: not valid JSON"):
        read_dataset(f, "content", "summary")


def test_nothing_usable_is_a_clear_error(tmp_path):
    for text, msg in [("", "the file is empty"), ('{"x": 1}\nnot json\n', "no usable example"),
                      ("[]", "no usable example")]:
        f = tmp_path / "d.jsonl"
        f.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=msg):
            read_dataset(f, "content", "summary")
    with pytest.raises(DataError, match="no such data file"):
        read_dataset(tmp_path / "missing.jsonl", "content", "summary")


# --- the command ---------------------------------------------------------------------------------------------

def _sampling(*argv):
    import argparse

    from glmkit.cli import eval as cli_eval
    p = argparse.ArgumentParser()
    cli_eval.add_arguments(p)
    return cli_eval.sampling_options(p.parse_args(["--data", "x", "--prompt-column", "a", "--response-column", "b",
                                                   *argv]))


def test_greedy_by_default_official_sampling_on_request():
    assert _sampling() == {"max_tokens": 512, "temperature": 0.0}
    assert _sampling("-n", "64", "--do-sample") == {"max_tokens": 64, "temperature": 0.95, "top_p": 0.7}
    assert _sampling("--seed", "3") == {"max_tokens": 512, "temperature": 0.95, "top_p": 0.7, "seed": 3}
    assert _sampling("--temperature", "0.5") == {"max_tokens": 512, "temperature": 0.5, "top_p": 0.7}
    assert _sampling("--temperature", "0", "--top-p", "0.9") == {"max_tokens": 512, "temperature": 0.0}


def test_unusable_data_fails_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    from glmkit.cli import eval as cli_eval

    def no_loading(args):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(cli_eval, "load_pipeline", no_loading)
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "q", "answer": "a"}\nnot json at all\n', encoding="utf-8")
    rc = main(["eval", "--model", str(tmp_path / "no-such-model"), "--data", str(f), "--prompt-column", "content",
               "--response-column", "summary"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{f}:1: no 'content' or 'summary' column" in err and f"{f}:2: not valid JSON" in err
    assert f"glmkit eval: error: {f}: no usable example" in err
    assert "no-such-model" not in err and "Traceback" not in err
    assert not (tmp_path / "eval-bad").exists()


def test_an_adapter_of_neither_format_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from glmkit.cli import eval as cli_eval
    monkeypatch.setattr(cli_eval, "load_pipeline", lambda args: pytest.fail("the model was loaded"))
    f = tmp_path / "d.jsonl"
    f.write_text('{"content": "q", "summary": "a"}\n', encoding="utf-8")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("not an adapter")
    rc = main(["eval", "--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "a"), "--data", str(f),
               "--prompt-column", "content", "--response-column", "summary"])
    assert rc == 1 and "neither a PEFT LoRA folder" in capsys.readouterr().err


EXAMPLES = [
    {"content": "类型#上衣*材质#牛仔布*颜色#白色", "summary": "简约而不简单的牛仔外套，白色的衣身十分百搭。"},
    {"content": "类型#裙*风格#复古", "summary": "复古的格子裙，文艺又简约。", "history": [["你好", "你好，请说。"]]},
    {"content": "Write one sentence about autumn.", "summary": "Autumn leaves fall slowly."},
    {"content": "类型#裤*版型#宽松", "summary": "宽松的裤型，遮肉显瘦。"},
    {"content": "类型#鞋*颜色#黑色", "summary": "黑色的单鞋，百搭又舒适。"},
]


@needs_shared
def test_eval_command_end_to_end(tmp_path, capsys):
    data = tmp_path / "adgen.jsonl"
    lines = [json.dumps(e, ensure_ascii=False) for e in EXAMPLES]
    lines.insert(2, '{"content": "类型#包", "summary": ')          # line 3: reported and skipped
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = REF / "chatglm3-6b"
    runs = {}
    for b in (1, 3):
        out = tmp_path / f"out{b}"
        rc = main(["eval", "--model", str(model), "--data", str(data), "--prompt-column", "content",
                   "--response-column", "summary", "--history-column", "history", "--max-new-tokens", "12",
                   "--batch-size", str(b), "--out", str(out)])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        assert f"{data}:3: not valid JSON" in cap.err
        assert "5 examples" in cap.out and "(1 skipped)" in cap.out and "greedy" in cap.out
        for k in METRICS:
            assert k in cap.out
        rows = [json.loads(s) for s in (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        assert [r["prompt"] for r in rows] == [e["content"] for e in EXAMPLES]
        assert [r["label"] for r in rows] == [e["summary"] for e in EXAMPLES]
        assert rows[1]["history"] == [["你好", "你好，请说。"]] and rows[0]["history"] == []
        assert set(METRICS) <= set(metrics) and set(METRICS) <= set(rows[0])
        assert metrics["examples"] == 5 and metrics["skipped"] == {"unusable": 1, "too_long": 0}
        assert metrics["settings"]["batch_size"] == b and metrics["settings"]["greedy"] is True
        assert metrics["settings"]["max_new_tokens"] == 12
        preds = [r["predict"] for r in rows]
        means = rouge_bleu(preds, [e["summary"] for e in EXAMPLES])
        for k in METRICS:
            assert metrics[k] == pytest.approx(means[k], abs=1e-9)
            assert [r[k] for r in rows] == [s[k] for s in sample_scores(preds, [e["summary"] for e in EXAMPLES])]
        runs[b] = preds

    pipe = ref_pipeline("chatglm3-6b")
    want = []
    for e in EXAMPLES:
        msgs = [m for q, a in e.get("history", []) for m in ({"role": "user", "content": q},
                                                              {"role": "assistant", "content": a})]
        want.append(str(pipe.chat(msgs + [{"role": "user", "content": e["content"]}], temperature=0,
                                  max_tokens=12)))
    assert runs[1] == want
    assert runs[3] == want
    assert any(want)


@needs_shared
def test_batched_greedy_equals_pipeline_on_chatglm_6b():
    """ChatGLM-6B (bidirectional context, 2D positions) through the batched engine path of evaluate()."""
    from glmkit.eval import Example
    from glmkit.eval.run import evaluate

    pipe = ref_pipeline("chatglm-6b")
    examples = [Example(e["content"], e["summary"], [tuple(t) for t in e.get("history", [])], f"x:{i}")
                for i, e in enumerate(EXAMPLES[:4])]
    want = [str(pipe.chat(ex.messages(), temperature=0, max_tokens=10)) for ex in examples]
    got = evaluate(pipe, examples, batch_size=2, temperature=0, max_tokens=10)
    assert got.predictions == want
    assert got.settings["batch_size"] == 2 and got.skipped == []
