"""Tokenizers of each GLM generation, read from the official files without running their code.

  ChatGLM-6B   ice_text.model (SentencePiece, nmt_nfkc normaliser). Text is pre-processed as the official
               tokenizer does: "\\n" -> <n>, "\\t" -> <|tab|>, runs of 2..80 spaces -> <|blank_N|>; decode
               reverses it. encode() appends [gMASK] <sop> ([MASK]/[sMASK]/[gMASK] in the text are kept as
               mask tokens; then only <sop> is appended, which is how GLM fills a blank).
  ChatGLM2/3   tokenizer.model (SentencePiece); [MASK] [gMASK] [sMASK] sop eop (+ ChatGLM3's role tokens) take
               the ids right after the SentencePiece vocabulary. encode() prefixes [gMASK] sop.
  GLM (2021)   cog-pretrain.model (SentencePiece, glm-large-chinese / glm-10b-chinese) or GPT-2 BPE vocab.json +
               merges.txt (glm-10b / glm-2b, read with the `tokenizers` package), command tokens from
               added_tokens.json or at the published ids. encode() wraps text as [CLS] ... <|endoftext|> and
               strips the whitespace next to a command token, as the official (transformers 4.23) tokenizer.
  GLM-4        tokenizer.model in tiktoken format (base64 token + rank per line) or transformers' tokenizer.json;
               special tokens from 151329 on (tokenizer_config.json's added_tokens_decoder when present).
               encode() prefixes [gMASK] <sop>.

encode(text) returns what the official tokenizer's encode returns (special tokens included: ChatGLM-6B and GLM-4
read special-token text such as "[gMASK]" or "<|assistant|>" as the special token, as the official ones do);
encode_plain(text) never does, and is what the chat formats use for the texts inside messages; decode(ids)
drops special tokens unless skip_special_tokens=False. IncrementalDecoder turns a stream of ids into text
pieces that never end in half a UTF-8 character or half of a <|blank_N|>/<|tab|>/<n> marker.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Common interface. Subclasses set family, special (name -> id), eos_id and implement the hooks."""

    family: str = ""
    special: dict[str, int]
    # a regex matching an unfinished text marker at the end of decoded text (held back while streaming)
    partial_marker: Optional[re.Pattern] = None

    def __init__(self):
        self.special_ids = set(self.special.values())
        self.id_to_special = {v: k for k, v in self.special.items()}
        from .chat_format import format_for     # chat_format knows formats; it imports nothing from here
        self.chat_format = format_for(self)

    # --- interface ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode_plain(self, text: str) -> list[int]:
        """Ordinary text -> ids: no special tokens recognised or added (message contents)."""
        raise NotImplementedError

    def _decode_plain(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def encode_for_generation(self, text: str) -> list[int]:
        """Raw text -> the ids a completion starts from (ChatGLM/GLM-4: what encode() gives)."""
        return self.encode(text)

    def encode_span(self, text: str) -> list[int]:
        """Text as it stands after a prompt (a multiple-choice answer or blank) -> ids."""
        return self.encode_plain(text)

    def token_id(self, token: str) -> int:
        if token in self.special:
            return self.special[token]
        raise TokenizerError(f"{token!r} is not a special token of the {self.family} tokenizer")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                if run:
                    out.append(self._decode_plain(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.id_to_special[i])
            else:
                run.append(i)
        if run:
            out.append(self._decode_plain(run))
        return "".join(out)

    def apply_chat_template(self, messages, tools=None, tool_choice=None, allow_special: bool = False) -> list[int]:
        """messages (+ tools) -> prompt ids ending with the generation prompt, as the official code builds them;
        texts inside messages are encoded as plain text unless allow_special=True (see ChatFormat.render)."""
        return self.chat_format.render(messages, tools=tools, tool_choice=tool_choice, allow_special=allow_special).ids

    def decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


# ------------------------------------------------------------------------------------------------------------
# SentencePiece tokenizers
# ------------------------------------------------------------------------------------------------------------

def _sp(path: Path):
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path} is not a SentencePiece model: {e}") from None


class ChatGLM6BTokenizer(Tokenizer):
    family = "chatglm"
    MAX_BLANK = 80
    SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
    MASKS = ("[MASK]", "[sMASK]", "[gMASK]")
    partial_marker = re.compile(r"<(?:\|(?:b(?:l(?:a(?:n(?:k(?:_(?:\d{1,2}\|?)?)?)?)?)?)?|t(?:a(?:b\|?)?)?)?|n)?$")

    def __init__(self, path: Path, num_image_tokens: int = 0):
        self.path = Path(path)
        self.sp = _sp(self.path)
        self.offset = num_image_tokens                 # older releases shifted ids by 20000 image tokens
        self.special = {}
        for name in self.SPECIALS + ("<unk>", "<s>", "</s>", "<pad>"):
            pid = self.sp.piece_to_id(name)
            if pid != self.sp.unk_id() or name == "<unk>":
                self.special[name] = pid + self.offset
        for must in ("[MASK]", "[gMASK]", "<sop>", "<eop>"):
            if must not in self.special:
                raise TokenizerError(f"{self.path} has no {must} piece: not a ChatGLM-6B ice_text.model")
        self.eos_id = self.special["<eop>"]
        self.pad_id = self.special.get("<pad>")
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")
        super().__init__()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size() + self.offset

    def _pre(self, text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(self.MAX_BLANK, 1, -1):
            if " " * n in text:
                text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    def _post(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        if "<|blank_" in text:
            text = re.sub(r"<\|blank_(\d+)\|>",
                          lambda m: " " * int(m.group(1)) if 2 <= int(m.group(1)) <= self.MAX_BLANK else m.group(0),
                          text)
        return text

    def encode_plain(self, text: str, dummy_prefix: bool = True) -> list[int]:
        if not text:
            return []
        pre = self._pre(text)
        if dummy_prefix:
            ids = self.sp.encode(pre)
        else:   # the official trick: a leading <n> absorbs SentencePiece's dummy "▁", then both are dropped
            ids = self.sp.encode("<n>" + pre)[2:]
        return [i + self.offset for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:                                  # a special token written in the text
                ids.append(self.special[part])
            elif part:
                ids += self.encode_plain(part, dummy_prefix=(k == 0))
        if add_special_tokens:
            masks = {self.special[m] for m in self.MASKS if m in self.special}
            if not masks & set(ids):
                ids.append(self.special["[gMASK]"])
            if not ids or ids[-1] != self.special["<sop>"]:
                ids.append(self.special["<sop>"])
        return ids

    def encode_span(self, text: str) -> list[int]:
        return self.encode_plain(text, dummy_prefix=False)     # inside a text: no SentencePiece "▁" first

    def _decode_plain(self, ids: Sequence[int]) -> str:
        # ids outside the SentencePiece vocabulary (image ids, the embedding's padding rows up to the
        # model's vocab size, which a sampler can pick) decode to nothing instead of raising
        n = self.sp.vocab_size()
        ids = [i - self.offset for i in ids if 0 <= i - self.offset < n and i != self.pad_id]
        return self._post(self.sp.decode(ids))


class ChatGLM2Tokenizer(Tokenizer):
    """ChatGLM2-6B and ChatGLM3-6B (the same tokenizer.model; ChatGLM3 adds the role tokens)."""

    def __init__(self, path: Path, family: str = "chatglm3"):
        self.family = family
        self.path = Path(path)
        self.sp = _sp(self.path)
        n = self.sp.vocab_size()
        names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
        if family == "chatglm3":
            names += ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
        self.special = {name: n + i for i, name in enumerate(names)}
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id()
        self.pad_id = self.sp.unk_id()
        super().__init__()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size() + len(self.special)

    def encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.encode_plain(text)
        return [self.special["[gMASK]"], self.special["sop"]] + ids if add_special_tokens else ids

    def _decode_plain(self, ids: Sequence[int]) -> str:
        n = self.sp.vocab_size()
        return self.sp.decode([i for i in ids if 0 <= i < n])


class GLM130BTokenizer(Tokenizer):
    """GLM-130B's icetk-glm-130B (SAT's _IceTokenizer): icetk's text ids are the SentencePiece ids of
    ice_text.model + 20000 (icetk's image tokens come first), text encoded as is (no <n> / blank markers;
    decode turns <n> back into newlines, as icetk does); SAT's specials from 150000, eos = </s> = 20002.
    ChatGLM-6B's ice_text.model holds the same pieces: its [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop>
    <ENC> <dBLOCK> sit at exactly the GLM-130B special ids minus 20000, which __init__ checks.

    encode(text) builds the model input as GLM-130B's generate.py does: each piece between masks encoded on
    its own, the mask ids in between, [gMASK] appended when the text has no mask, else eos when it does not
    end with a mask, then sop."""
    family = "glm130b"
    OFFSET = 20000
    PIECES = {"[MASK]": "[MASK]", "[gMASK]": "[gMASK]", "[sMASK]": "[sMASK]", "eod": "<unused_0>",
              "sop": "<sop>", "eop": "<eop>", "ENC": "<ENC>", "dBLOCK": "<dBLOCK>", "eos": "</s>"}
    MASK_RE = re.compile(r"(\[[sg]?MASK\])")

    def __init__(self, path: Path):
        from .config import GLM130B_IDS
        self.path = Path(path)
        self.sp = _sp(self.path)
        self.special = {}
        for name, piece in self.PIECES.items():
            got = self.sp.piece_to_id(piece) + self.OFFSET
            if got != GLM130B_IDS[name]:
                raise TokenizerError(f"{self.path}: piece {piece} has id {got - self.OFFSET}; icetk-glm-130B needs "
                                     f"{GLM130B_IDS[name] - self.OFFSET} (use ChatGLM-6B's or icetk's ice_text.model)")
            self.special[name] = got
        self.eos_id = self.special["eop"]
        self.pad_id = None
        super().__init__()

    @property
    def vocab_size(self) -> int:
        return max(self.special.values()) + 1

    def encode_plain(self, text: str) -> list[int]:
        return [i + self.OFFSET for i in self.sp.encode(text)] if text else []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        parts = self.MASK_RE.split(text)
        ids: list[int] = []
        for k, part in enumerate(parts):
            ids += [self.special[part]] if k % 2 else self.encode_plain(part)
        if add_special_tokens:
            if len(parts) == 1:                        # generate.py appends " [gMASK]" to the text itself
                ids.append(self.special["[gMASK]"])
            elif not text.endswith("MASK]"):
                ids.append(self.special["eos"])
            ids.append(self.special["sop"])
        return ids

    def _decode_plain(self, ids: Sequence[int]) -> str:
        n = self.sp.vocab_size()
        ids = [i - self.OFFSET for i in ids if 0 <= i - self.OFFSET < n]
        return self.sp.decode(ids).replace("<n>", "\n")


def find_icetk_model(folder: Path) -> Optional[Path]:
    """ice_text.model for a GLM-130B folder: in it, beside it, or where icetk keeps it (~/.icetk_models)."""
    for d in (folder, folder.parent, Path("~/.icetk_models").expanduser()):
        if (d / "ice_text.model").is_file():
            return d / "ice_text.model"
    return None


# ------------------------------------------------------------------------------------------------------------
# The original GLM (2021): command tokens around a SentencePiece or GPT-2 BPE vocabulary
# ------------------------------------------------------------------------------------------------------------

GLM_MASKS = ("[MASK]", "[sMASK]", "[gMASK]")
# GLM's own order of the command tokens added after the GPT-2 vocabulary (glm-10b: sop = 50257 ... [sMASK] 50264)
GLM_GPT2_COMMANDS = ("<|startofpiece|>", "<|endofpiece|>", "[CLS]", "[MASK]", "[SEP]", "[UNK]", "[gMASK]", "[sMASK]")


def _added_tokens(folder: Path) -> dict[str, int]:
    f = folder / "added_tokens.json"
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not all(isinstance(v, int) for v in d.values()):
        raise TokenizerError(f"{f} must map token strings to integer ids")
    return d


class GLMTokenizer(Tokenizer):
    """The original GLM's tokenizers (GLMChineseTokenizer / GLMGPT2Tokenizer): subclasses give the vocabulary."""

    family = "glm"

    def _setup(self, special: dict[str, int]):
        for must in ("[CLS]", "<|endoftext|>", "<|startofpiece|>", "<|endofpiece|>", "[MASK]"):
            if must not in special:
                raise TokenizerError(f"{self.path}: no id for GLM's command token {must}")
        self.special = special
        self.eos_id = special["<|endofpiece|>"]          # a span ends here (generation stops)
        self.pad_id = special["<|endoftext|>"]
        self.mask_ids = {special[m] for m in GLM_MASKS if m in special}
        names = sorted(special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in names) + ")")
        super().__init__()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """As the official tokenizer: command tokens written in the text are tokens, the whitespace on both sides
        of each is dropped, every other piece is encoded on its own; [CLS] ... <|endoftext|> around it all."""
        parts = self._split.split(text)
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special[part])
                continue
            if k > 0:
                part = part.lstrip()
            if k < len(parts) - 1:
                part = part.rstrip()
            ids += self.encode_plain(part)
        if add_special_tokens:
            ids = [self.special["[CLS]"]] + ids + [self.special["<|endoftext|>"]]
        return ids

    def encode_span(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=False)      # as build_inputs_for_multiple_choice does

    def encode_for_generation(self, text: str) -> list[int]:
        """[CLS] text <|endoftext|> <|startofpiece|>, as build_inputs_for_generation extends it; text without a
        mask gets [gMASK] as its last text token (left-to-right generation, as GLM's generate scripts do)."""
        ids = self.encode(text)
        if not self.mask_ids & set(ids):
            ids.insert(len(ids) - 1, self.special["[gMASK]"])
        return ids + [self.special["<|startofpiece|>"]]


class GLMChineseTokenizer(GLMTokenizer):
    """cog-pretrain.model: SentencePiece pieces 0..49999, command tokens 50000.. (added_tokens.json)."""

    def __init__(self, folder: Path):
        from .config import GLM_CHINESE_IDS

        self.path = Path(folder) / "cog-pretrain.model"
        self.sp = _sp(self.path)
        self._setup(_added_tokens(Path(folder)) or dict(GLM_CHINESE_IDS))

    @property
    def vocab_size(self) -> int:
        return max(self.sp.vocab_size(), max(self.special.values()) + 1)

    def encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def _decode_plain(self, ids: Sequence[int]) -> str:
        n = self.sp.vocab_size()
        return self.sp.decode([i for i in ids if 0 <= i < n])


class GLMGPT2Tokenizer(GLMTokenizer):
    """GPT-2's byte-level BPE (vocab.json + merges.txt, through the `tokenizers` package) with GLM's command
    tokens: from added_tokens.json when the folder has one, else after the vocabulary in GLM's order."""

    def __init__(self, folder: Path):
        try:
            from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
        except ImportError:
            raise TokenizerError("glm-10b / glm-2b need the `tokenizers` package for their GPT-2 BPE: "
                                 "pip install 'glmkit[glm]'") from None
        folder = Path(folder)
        self.path = folder / "vocab.json"
        try:
            bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        except Exception as e:                      # tokenizers raises its own Exception type
            raise TokenizerError(f"{folder}: vocab.json + merges.txt are not a GPT-2 BPE: {e}") from None
        self.hf = HFTokenizer(bpe)
        self.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.hf.decoder = decoders.ByteLevel()
        vocab = self.hf.get_vocab()
        self.n_vocab = len(vocab)
        special = {"<|endoftext|>": vocab["<|endoftext|>"]} if "<|endoftext|>" in vocab else {}
        added = _added_tokens(folder)
        if added:
            special.update(added)
        else:
            special.update({name: self.n_vocab + i for i, name in enumerate(GLM_GPT2_COMMANDS)})
        self._setup(special)

    @property
    def vocab_size(self) -> int:
        return max(self.n_vocab, max(self.special.values()) + 1)

    def encode_plain(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids if text else []

    def _decode_plain(self, ids: Sequence[int]) -> str:
        return self.hf.decode([i for i in ids if 0 <= i < self.n_vocab], skip_special_tokens=False)


def load_glm_tokenizer(folder: Path) -> GLMTokenizer:
    folder = Path(folder)
    if (folder / "cog-pretrain.model").is_file():
        return GLMChineseTokenizer(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return GLMGPT2Tokenizer(folder)
    raise TokenizerError(f"{folder} has no GLM tokenizer: expected cog-pretrain.model (glm-large-chinese, "
                         "glm-10b-chinese) or vocab.json + merges.txt (GPT-2 BPE of glm-10b / glm-2b)")


# ------------------------------------------------------------------------------------------------------------
# GLM-4 (tiktoken)
# ------------------------------------------------------------------------------------------------------------

GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable character map used by transformers' byte-level BPE files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class GLM4Tokenizer(Tokenizer):
    family = "glm4"

    def __init__(self, folder: Path):
        import tiktoken

        folder = Path(folder)
        tok_model, tok_json = folder / "tokenizer.model", folder / "tokenizer.json"
        pattern = GLM4_PATTERN
        specials_from_file: dict[str, int] = {}
        if tok_model.is_file():
            ranks = {}
            with open(tok_model, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        tok, rank = line.split()
                        ranks[base64.b64decode(tok, validate=True)] = int(rank)
                    except ValueError:
                        raise TokenizerError(f"{tok_model}:{lineno} is not a 'base64-token rank' line") from None
            self.path = tok_model
        elif tok_json.is_file():
            ranks, pattern, specials_from_file = self._from_tokenizer_json(tok_json)
            self.path = tok_json
        else:
            raise TokenizerError(f"{folder} has neither tokenizer.model nor tokenizer.json")
        n = len(ranks)
        special = {name: n + i for i, name in enumerate(GLM4_SPECIALS)}
        special.update(specials_from_file)
        special.update(self._specials_from_config(folder / "tokenizer_config.json"))
        self.special = special
        self.n_ranks = n
        self.enc = tiktoken.Encoding(name=f"glm4:{folder}", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=special)
        self.eos_id = special["<|endoftext|>"]
        self.pad_id = self.eos_id
        self._max_id = max(max(ranks.values(), default=0), max(special.values()))
        super().__init__()

    @staticmethod
    def _specials_from_config(path: Path) -> dict[str, int]:
        if not path.is_file():
            return {}
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        out = {}
        for k, v in (d.get("added_tokens_decoder") or {}).items():
            if isinstance(v, dict) and "content" in v:
                out[v["content"]] = int(k)
        return out

    @staticmethod
    def _from_tokenizer_json(path: Path):
        d = json.loads(path.read_text(encoding="utf-8"))
        model = d.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{path}: expected a byte-level BPE tokenizer.json, got {model.get('type')!r}")
        inv = {c: b for b, c in _bytes_to_unicode().items()}
        ranks = {}
        for tok, i in model["vocab"].items():
            try:
                ranks[bytes(inv[c] for c in tok)] = int(i)
            except KeyError:
                raise TokenizerError(f"{path}: vocab entry {tok!r} is not byte-level") from None
        pattern = GLM4_PATTERN
        pre = d.get("pre_tokenizer") or {}
        for p in [pre] + list(pre.get("pretokenizers") or []):
            if p.get("type") == "Split" and isinstance(p.get("pattern"), dict) and "Regex" in p["pattern"]:
                pattern = p["pattern"]["Regex"]
        specials = {t["content"]: int(t["id"]) for t in d.get("added_tokens") or [] if t.get("special", True)}
        return ranks, pattern, specials

    @property
    def vocab_size(self) -> int:
        return self._max_id + 1

    def encode_plain(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text) if text else []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # as the official (transformers) tokenizer: special tokens written in the text are recognised
        ids = self.enc.encode(text, allowed_special="all") if text else []
        return [self.special["[gMASK]"], self.special["<sop>"]] + ids if add_special_tokens else ids

    def _decode_plain(self, ids: Sequence[int]) -> str:
        return self.enc.decode_bytes([i for i in ids if 0 <= i < self.n_ranks]).decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------------------------
# Streaming detokenizer
# ------------------------------------------------------------------------------------------------------------

class IncrementalDecoder:
    """ids in, text pieces out. Each piece is final: later ids never change text already returned.

    Decodes a small window (the ids since the last emitted block, plus the block before it for context, so
    SentencePiece's leading-space handling is the same as in a full decode) and holds text back while it
    ends in an incomplete UTF-8 sequence (U+FFFD) or in an unfinished marker such as "<|blank_1".
    """

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0          # window start
        self.read = 0            # ids up to here are emitted

    def _safe(self, text: str) -> bool:
        if text.endswith("\ufffd"):
            return False
        pm = self.tok.partial_marker
        return not (pm is not None and pm.search(text))

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._step(final=False)

    def _step(self, final: bool) -> str:
        dec = self.tok.decode
        prefix_text = dec(self.ids[self.prefix:self.read], self.skip)
        new_text = dec(self.ids[self.prefix:], self.skip)
        if len(new_text) <= len(prefix_text) and not final:
            return ""
        if not final and not self._safe(new_text):
            return ""
        if not new_text.startswith(prefix_text):
            # cannot happen with the hold-back rules above; keep the stream monotone regardless
            common = len(prefix_text)
            delta = new_text[common:]
        else:
            delta = new_text[len(prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def flush(self) -> str:
        """Everything still held back (call once when the stream ends)."""
        if self.read == len(self.ids):
            return ""
        return self._step(final=True)


# ------------------------------------------------------------------------------------------------------------
# Folder -> tokenizer
# ------------------------------------------------------------------------------------------------------------

def load_tokenizer(folder, family: str) -> Tokenizer:
    folder = Path(folder)
    if family == "glm130b":
        f = find_icetk_model(folder)
        if f is None:
            raise TokenizerError(f"no ice_text.model for the GLM-130B checkpoint {folder}: put icetk's (or ChatGLM-6B's, "
                                 "the same pieces) in the folder, beside it or in ~/.icetk_models/")
        return GLM130BTokenizer(f)
    if family == "chatglm":
        f = folder / "ice_text.model"
        if not f.is_file():
            raise TokenizerError(f"{folder} has no ice_text.model (the ChatGLM-6B tokenizer)")
        num_image = 0
        tc = folder / "tokenizer_config.json"
        if tc.is_file():
            try:
                num_image = int(json.loads(tc.read_text(encoding="utf-8")).get("num_image_tokens", 0) or 0)
            except (json.JSONDecodeError, ValueError, UnicodeDecodeError):
                num_image = 0
        return ChatGLM6BTokenizer(f, num_image_tokens=num_image)
    if family in ("chatglm2", "chatglm3"):
        f = folder / "tokenizer.model"
        if not f.is_file():
            raise TokenizerError(f"{folder} has no tokenizer.model")
        return ChatGLM2Tokenizer(f, family=family)
    if family == "glm4":
        return GLM4Tokenizer(folder)
    if family == "glm":
        return load_glm_tokenizer(folder)
    raise TokenizerError(f"unknown tokenizer family {family!r}")
