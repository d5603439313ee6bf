"""`glmkit train-tokenizer`: a SentencePiece model in ChatGLM-6B's conventions (ice_text.model +
tokenizer_config.json) that glmkit reads as the ChatGLM-6B tokenizer; lossless round trips, control symbols
not matched in text, determinism, the CLI with bad inputs, and a tiny ChatGLM-6B model that uses it."""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil

import pytest

from conftest import SHARED
from glmkit.tokenizer import ChatGLM6BTokenizer, load_tokenizer
from glmkit.train.tokenizer import fit_coverage, sentences, train_tokenizer

CORPORA = SHARED / "corpora"
TANG = CORPORA / "chinese-poetry" / "全唐诗"
ENGLISH = CORPORA / "english"
needs_corpora = pytest.mark.skipif(not (TANG.is_dir() and ENGLISH.is_dir()),
                                   reason=f"{CORPORA} (chinese-poetry and english corpora) is absent")

# --- a bilingual corpus that needs nothing from ../shared ----------------------------------------------------
ZH = ("床前明月光疑是地上霜举头望明月低头思故乡白日依山尽黄河入海流欲穷千里目更上一层楼春眠不觉晓处处闻啼鸟"
      "夜来风雨声花落知多少红豆生南国春来发几枝愿君多采撷此物最相思千山鸟飞绝万径人踪灭孤舟蓑笠翁独钓寒江雪")
EN = ("the moon is bright over quiet river and old man sits alone in his small boat while snow falls "
      "on thousand mountains where no bird flies every path empty of people spring we sleep late").split()
SYLLABLES = ["ka", "lo", "mi", "ren", "sto", "pa", "ver", "qui", "tal", "no", "be", "ing", "ed", "ion", "tr", "an"]
OWN_VOCAB = 2000


def bilingual_text(n_docs: int = 1500, seed: int = 0) -> str:
    """Poem-like Chinese lines, English-like sentences with numbers, indented code with tabs (~150 KB)."""
    rng = random.Random(seed)
    zh = sorted(set(ZH))
    words = EN + ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    docs = []
    for i in range(n_docs):
        if i % 3 == 0:
            docs.append("\n".join("".join(rng.choice(zh) for _ in range(rng.choice((5, 7)))) + rng.choice("，。！")
                                  for _ in range(rng.randint(2, 8))))
        elif i % 3 == 1:
            sent = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + rng.choice(".!?")
                    for _ in range(rng.randint(1, 5))]
            docs.append(" ".join(sent) + f" In {rng.randint(1900, 2030)} there were {rng.randint(0, 999)}.")
        else:
            body = "\n".join(" " * rng.choice((0, 2, 4, 8)) + rng.choice(words) + " = " + str(rng.randint(0, 99))
                             + ("\t# " + rng.choice(zh) * 2 if rng.random() < 0.5 else "") for _ in range(4))
            docs.append(f"def {rng.choice(words)}():\n{body}")
    return "\n\n".join(docs) + "\n"


@pytest.fixture(scope="module")
def own_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("own_corpus")
    (d / "bilingual.txt").write_text(bilingual_text(), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def own_tok_dir(own_corpus, tmp_path_factory):
    return train_tokenizer([own_corpus], tmp_path_factory.mktemp("own_tok"), OWN_VOCAB, progress=False)


@pytest.fixture(scope="module")
def own_tok(own_tok_dir):
    return load_tokenizer(own_tok_dir, "chatglm")


# --- a sample of the real corpora ----------------------------------------------------------------------------
def tang_poems(name="poet.tang.0.json"):
    return json.loads((TANG / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def real_corpus(tmp_path_factory):
    if not (TANG.is_dir() and ENGLISH.is_dir()):
        pytest.skip(f"{CORPORA} (chinese-poetry and english corpora) is absent")
    d = tmp_path_factory.mktemp("real_corpus")
    (d / "tang.json").write_text(json.dumps(tang_poems()[:600], ensure_ascii=False), encoding="utf-8")
    text = (ENGLISH / "tinyshakespeare.txt").read_text(encoding="utf-8")[:150_000]
    (d / "shakespeare.txt").write_text(text, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def real_tok(real_corpus, tmp_path_factory):
    out = train_tokenizer([real_corpus], tmp_path_factory.mktemp("real_tok"), 4000, progress=False)
    return load_tokenizer(out, "chatglm")


def _check_chatglm_conventions(tok, vocab_size):
    assert isinstance(tok, ChatGLM6BTokenizer)
    assert tok.vocab_size == vocab_size == tok.sp.vocab_size()
    sp = tok.sp
    assert [sp.id_to_piece(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<pad>", "<n>"]
    for name in ChatGLM6BTokenizer.SPECIALS:                 # every special token has its own id
        assert name in tok.special and sp.id_to_piece(tok.special[name]) == name and sp.is_control(tok.special[name])
    assert len({tok.special[n] for n in ChatGLM6BTokenizer.SPECIALS}) == len(ChatGLM6BTokenizer.SPECIALS)
    for marker in ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]:
        i = sp.piece_to_id(marker)
        assert i != sp.unk_id() and sp.id_to_piece(i) == marker and sp.is_unused(i) is False
    assert tok.eos_id == tok.special["<eop>"] and tok.pad_id == 3
    ids = tok.encode("床前明月光，[MASK]。")
    assert tok.special["[MASK]"] in ids and ids[-1] == tok.special["<sop>"]
    assert tok.special["[gMASK]"] not in ids                 # a mask in the text: only <sop> is appended
    ids = tok.encode("床前明月光")
    assert ids[-2:] == [tok.special["[gMASK]"], tok.special["<sop>"]]


def test_own_corpus_loads_as_chatglm_tokenizer(own_tok, own_tok_dir):
    _check_chatglm_conventions(own_tok, OWN_VOCAB)
    cfg = json.loads((own_tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["bos_token"] == "<sop>" and cfg["eos_token"] == "<eop>" and cfg["gmask_token"] == "[gMASK]"
    assert cfg["mask_token"] == "[MASK]" and cfg["pad_token"] == "<pad>" and cfg["unk_token"] == "<unk>"
    assert cfg["num_image_tokens"] == 0 and "auto_map" not in cfg
    assert sorted(p.name for p in own_tok_dir.iterdir()) == ["ice_text.model", "tokenizer_config.json"]


def test_official_conventions_are_followed(own_tok):
    """The pieces the official ice_text.model has besides the learned ones, of the same types."""
    official = SHARED / "glm" / "official" / "chatglm-6b" / "ice_text.model"
    if not official.is_file():
        pytest.skip(f"{official} is absent")
    from sentencepiece import sentencepiece_model_pb2 as pb

    def meta(path):
        m = pb.ModelProto()
        m.ParseFromString(path.read_bytes())
        return {p.piece: p.type for p in m.pieces if p.type != pb.ModelProto.SentencePiece.NORMAL}, m

    ours, m_ours = meta(own_tok.path)
    theirs, m_theirs = meta(official)
    assert ours == theirs
    assert m_ours.normalizer_spec.name == "identity" and m_theirs.normalizer_spec.name == "nmt_nfkc"
    assert m_ours.normalizer_spec.add_dummy_prefix and not m_ours.normalizer_spec.remove_extra_whitespaces
    assert m_ours.trainer_spec.byte_fallback and m_ours.trainer_spec.split_digits


@needs_corpora
def test_real_corpus_sample(real_tok):
    _check_chatglm_conventions(real_tok, 4000)
    poems = ["\n".join(p["paragraphs"]) for p in tang_poems()[:50]]
    n_tokens = sum(len(real_tok.encode_plain(p)) for p in poems)
    assert n_tokens < 1.05 * sum(map(len, poems))              # (nearly) every character is a piece


ROUND_TRIP = [
    "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "GLM 模型在 2023 年发布，支持中英双语（Chinese & English）！",
    "line one\nline two\n\n\nafter blank lines\n",
    "\tindented\twith\ttabs\t",
    "a  b   c    d" + " " * 80 + "e" + " " * 81 + "f" + " " * 200 + "g",
    " leading space", "  two leading", "trailing  ", " ", "  ", "\n", "\n\nx", "x\r\ny",
    "1234567890 3.14159 -42 1e10 ０１２",
    "emoji 😀🎉 and rare 𠀀𪚥 chars ㊣ ﷺ",
    "ﬁ ligature, full-width ，。！？：；（） and Ａ full-width letters, ideographic　space",
    "<unk> <s> </s> <pad> look like pieces but stay text; so does <|blank_1|> and <|blank_81|>",
    "[MASK] [gMASK] [sMASK] <sop> <eop> <ENC> <dBLOCK> <unused_0> written as text",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_lossless_round_trip(own_tok, text):
    ids = own_tok.encode_plain(text)
    assert own_tok.decode(ids) == text
    assert own_tok.sp.unk_id() not in ids                     # byte fallback: never <unk>
    assert not set(ids) & own_tok.special_ids                 # control symbols are not matched in text


@needs_corpora
def test_lossless_on_held_out_real_text(real_tok):
    poems = tang_poems("poet.tang.1000.json")[:100]           # not in the training sample
    for p in poems:
        text = p["title"] + "\n" + "\n".join(p["paragraphs"])
        assert real_tok.decode(real_tok.encode_plain(text)) == text
    wiki = (ENGLISH / "wiki_demo.txt").read_text(encoding="utf-8")[:20_000]
    assert real_tok.decode(real_tok.encode_plain(wiki)) == wiki


MARKER = re.compile(r"<n>|<\|tab\|>|<\|blank_\d+\|>")


def test_lossless_property(own_tok):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    alphabet = st.sampled_from(list("床前明月光疑是地上霜舉頭望，。！？abcXYZéü 0123456789\n\t\r<>|_nbtk[]MASK-'\"")
                               + ["😀", "𠀀", "　", "ﬁ", "Ａ", "\u200b"])

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
    @hypothesis.given(st.text(alphabet=alphabet, max_size=60))
    def check(text):
        # text that already holds a marker decodes to the whitespace it stands for (as with the official
        # tokenizer); SentencePiece's "▁" is not in the alphabet
        hypothesis.assume(not MARKER.search(text))
        hypothesis.assume(not any(s in text for s in ChatGLM6BTokenizer.SPECIALS))   # encode() maps those
        assert own_tok.decode(own_tok.encode_plain(text)) == text
        assert own_tok.decode(own_tok.encode(text)) == text

    check()


def test_mask_text_is_not_a_control_symbol(own_tok):
    mask = own_tok.special["[MASK]"]
    text = "床前明月光，[MASK]。"
    plain = own_tok.encode_plain(text)
    assert mask not in plain and own_tok.decode(plain) == text
    full = own_tok.encode(text)
    assert mask in full and full.count(mask) == 1
    assert own_tok.decode(full) == "床前明月光，。"                # decode drops the special tokens
    assert own_tok.decode(full, skip_special_tokens=False) == text + "<sop>"


def test_same_seed_same_model(own_corpus, tmp_path):
    # max_sentences below the corpus' 1500 sentences, so the sampling is exercised too
    a = train_tokenizer([own_corpus], tmp_path / "a", OWN_VOCAB, seed=3, max_sentences=1200, progress=False)
    b = train_tokenizer([own_corpus], tmp_path / "b", OWN_VOCAB, seed=3, max_sentences=1200, progress=False)
    digest = [hashlib.sha256((d / "ice_text.model").read_bytes()).hexdigest() for d in (a, b)]
    assert digest[0] == digest[1]
    assert (a / "tokenizer_config.json").read_bytes() == (b / "tokenizer_config.json").read_bytes()
    assert not [p for p in a.iterdir() if p.name.startswith(".")]    # no temporary files left


def test_sentences_are_bounded_and_keep_markers():
    pre = ChatGLM6BTokenizer.__new__(ChatGLM6BTokenizer)._pre
    doc = pre("\n".join(f"line {i} " + "word " * (i % 50) + "\t" + " " * (i % 7) for i in range(2000)))
    out = list(sentences(doc, max_chars=300))
    assert all(0 < len(s) <= 300 for s in out)
    assert all(s.startswith("<n>") for s in out[1:])
    assert "".join(out) == doc                                # cut only before <n> here: nothing lost
    long_line = pre(("字" * 250 + " ") * 3 + "  " * 400)
    out = list(sentences(long_line, max_chars=300))
    assert all(0 < len(s) <= 300 for s in out)
    for s in out:                                             # never inside a <|blank_N|> marker
        assert not re.search(r"<\|?[^>]*$", s) and not re.match(r"^[^<]*>", s)


@pytest.mark.parametrize("marker", ["<|tab|>", "<|blank_2|>", "<|blank_12|>"])
def test_long_line_is_never_cut_inside_a_marker(marker):
    for offset in range(len(marker) + 2):                     # the cut at every position around the marker
        line = "字" * (290 + offset) + marker + "字" * 400
        out = list(sentences(line, max_chars=300))
        assert "".join(out) == line and all(len(s) <= 300 for s in out)
        assert all(marker in s or ("<" not in s and ">" not in s) for s in out)


def test_coverage_is_lowered_when_characters_do_not_fit():
    sample = ["".join(chr(0x4E00 + i) * (1000 - i) for i in range(1000))]
    cov, n = fit_coverage(sample, 0.9995, vocab_size=600, n_meta=349)
    assert cov < 0.9995 and n == int(0.75 * (600 - 349))
    assert fit_coverage(sample, 0.9995, vocab_size=5000, n_meta=349)[0] == 0.9995


def test_small_cjk_vocab_still_trains(real_corpus, tmp_path):
    """3000 pieces cannot hold every character of 600 Tang poems at 0.9995: the coverage is lowered."""
    out = train_tokenizer([real_corpus], tmp_path / "t", 3000, progress=False)
    tok = load_tokenizer(out, "chatglm")
    assert tok.vocab_size == 3000
    text = "床前明月光，疑是地上霜。"
    assert tok.decode(tok.encode_plain(text)) == text


# --- the command line ----------------------------------------------------------------------------------------
def test_cli_trains_and_reports_bad_inputs(own_corpus, tmp_path, capsys):
    from glmkit.cli.main import main

    inputs = tmp_path / "in"
    shutil.copytree(own_corpus, inputs)
    (inputs / "empty.txt").write_bytes(b"")
    (inputs / "latin1.txt").write_bytes("first line\nsecond line\ncaf\xe9 au lait\n".encode("latin-1"))
    (inputs / "records.jsonl").write_text('{"text": "a good line"}\n{"text": broken\n{"text": "fine again"}\n',
                                          encoding="utf-8")
    out = tmp_path / "tok"
    rc = main(["train-tokenizer", "--input", str(inputs), "--vocab-size", str(OWN_VOCAB), "--out", str(out),
               "--seed", "1", "--max-sentences", "100000", "--character-coverage", "0.9999"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert (out / "ice_text.model").is_file() and (out / "tokenizer_config.json").is_file()
    assert "Traceback" not in cap.err
    assert re.search(r"warning: .*empty\.txt: empty file", cap.err)
    assert re.search(r"warning: .*latin1\.txt:3: not UTF-8", cap.err)
    assert re.search(r"warning: .*records\.jsonl:2: not JSON", cap.err)
    assert "ice_text.model" in cap.out
    tok = load_tokenizer(out, "chatglm")
    assert tok.vocab_size == OWN_VOCAB
    assert tok.decode(tok.encode_plain("café au lait")) == "café au lait"


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    from glmkit.cli.main import main

    rc = main(["train-tokenizer", "--input", str(tmp_path / "missing"), "--vocab-size", "2000",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "no such file or folder" in err and "Traceback" not in err
    (tmp_path / "tiny.txt").write_text("just a few words\n", encoding="utf-8")
    rc = main(["train-tokenizer", "--input", str(tmp_path / "tiny.txt"), "--vocab-size", "2000",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot make 2000 pieces" in err
    assert not (tmp_path / "o" / "ice_text.model").exists()


def test_cli_help_explains_the_output(capsys):
    from glmkit.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["train-tokenizer", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("ice_text.model", "tokenizer_config.json", "<|blank_", "[gMASK]", "lossless", "examples:"):
        assert word in out


# --- a model that uses the tokenizer ---------------------------------------------------------------------------
def test_tiny_chatglm_model_with_trained_tokenizer(own_tok, own_tok_dir, tmp_path):
    import glmkit
    from glmkit.checkpoint import save_model
    from glmkit.config import preset
    from glmkit.model import GLM

    sp = own_tok.special
    cfg = preset("chatglm-6b").replace(
        vocab_size=own_tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
        ffn_hidden_size=128, max_seq_len=256, rope_dim=0, mask_token_id=sp["[MASK]"],
        gmask_token_id=sp["[gMASK]"], smask_token_id=sp["[sMASK]"], sop_token_id=sp["<sop>"],
        eos_token_id=sp["<eop>"], pad_token_id=sp["<pad>"], name="tiny-chatglm-trained-tokenizer")
    assert cfg.family == "chatglm" and cfg.rope_2d and cfg.prefix_lm and cfg.glm_residual
    assert cfg.norm == "layernorm" and cfg.activation == "gelu_tanh" and cfg.qkv_layout == "per_head"
    assert not cfg.rope_interleaved
    folder = save_model(GLM(cfg).init_weights(seed=0), tmp_path / "model", source_dir=own_tok_dir)
    assert (folder / "ice_text.model").read_bytes() == (own_tok_dir / "ice_text.model").read_bytes()
    pipe = glmkit.load(folder)
    assert isinstance(pipe.tokenizer, ChatGLM6BTokenizer) and pipe.tokenizer.vocab_size == own_tok.vocab_size
    out = pipe.generate("床前明月光", max_new_tokens=5, temperature=0)
    assert isinstance(out, str)
    assert pipe.generate("床前明月光", max_new_tokens=5, temperature=0) == out
    assert isinstance(pipe.generate("床前[MASK]光", max_new_tokens=5, temperature=0), str)
