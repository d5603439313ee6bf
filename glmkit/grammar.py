"""Structured outputs as a logits mask, through llguidance (chosen by measurement: benchmarks/grammar.py and
the README's "Structured outputs"): a JSON Schema (response_format json_schema, Pipeline schema=), any JSON
object (json_object, json=True) and tool calls constrained by each tool's own parameter schema, in the
model's own call syntax (GLM-4: `name\\n{json}`; ChatGLM3: `name\\n```python\\ntool_call(k=v, ...)\\n````).

Per tokenizer (once, cached): the bytes each id adds to the answer text, handed to llguidance as its
vocabulary. Special ids, SentencePiece control/unknown pieces and padding rows become llguidance special
tokens, never allowed inside text. ChatGLM-6B's decode rewrites <n>, <|tab|>, <|blank_N|> as whitespace even
when they form across token boundaries, so there ids whose text holds "<" are kept out of constrained text.
The grammar engine (Earley parser + lexer over a token trie) is llguidance's; what is glmkit's: the vocabulary,
the tool-call grammars (Lark with %json for the values), the checks that make a bad schema a clear error, and
the budget: with max_tokens, once only `reserve` tokens are left the constraint is *closing*: among the ids the
grammar allows it takes a stop id, else a closing quote / brace / bracket / parenthesis when one is allowed,
else leaves the choice to the model; an answer that still does not fit ends with finish_reason "length".
"""
from __future__ import annotations

import json
import keyword
import re
import threading
import weakref
from typing import Iterable, Optional

import numpy as np
import torch

from .tokenizer import Tokenizer


class GrammarError(ValueError):
    """A schema or tool definition that cannot be decoded under (the message says where and why)."""


class ConstraintError(RuntimeError):
    """A token the grammar refused, or a state with no allowed token (a bug, not bad input)."""


# whitespace between JSON tokens: at most two spaces/newlines, so that a model cannot loop on whitespace
WHITESPACE = r"[\x20\x0A]{0,2}"
# JSON escapes whose meaning Python literals share (ChatGLM3 calls are read back with ast: "\/" would differ)
ESCAPES = "\"\\bfnrtu"
MAX_PARALLEL_CALLS = 4
# closing: one-character tokens tried (in runs of up to LOOKAHEAD) to finish a string a format or pattern holds
CLOSING_ALPHABET = [bytes([c]) for c in b"@.a0:-TZ1+_xA"]
LOOKAHEAD = 6


# ------------------------------------------------------------------------------------------------------------
# Vocabulary
# ------------------------------------------------------------------------------------------------------------

def _sp_bytes(sp, i: int) -> Optional[bytes]:
    if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        return None
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def token_bytes(tok: Tokenizer) -> list[Optional[bytes]]:
    """id -> the bytes it adds to decoded text mid-stream, or None (never part of constrained text)."""
    n = tok.vocab_size
    out: list[Optional[bytes]] = [None] * n
    family = tok.family
    if family == "glm4":
        for i in range(min(n, tok.n_ranks)):
            out[i] = tok.enc.decode_single_token_bytes(i)
    elif family in ("chatglm2", "chatglm3"):
        for i in range(tok.sp.vocab_size()):
            out[i] = _sp_bytes(tok.sp, i)
    elif family == "chatglm":
        for j in range(tok.sp.vocab_size()):
            b = _sp_bytes(tok.sp, j)
            if b is not None:
                text = tok._post(b.decode("utf-8", errors="replace"))
                b = None if "<" in text or "\ufffd" in text else text.encode("utf-8")
            if j + tok.offset < n:
                out[j + tok.offset] = b
    else:
        raise GrammarError(f"no structured outputs for the {family} tokenizer")
    for i in tok.special_ids:
        if 0 <= i < n:
            out[i] = None
    pad = getattr(tok, "pad_id", None)
    if pad is not None and 0 <= pad < n:
        out[pad] = None
    return out


class _Vocab:
    """What llguidance needs of a glmkit tokenizer: token bytes, specials as 0xFF-prefixed names, and a
    tokenize callback (greedy longest match over the same bytes: any exact tokenization will do, llguidance
    uses it only for text the grammar forces)."""

    def __init__(self, tok: Tokenizer, stop_ids: tuple):
        import llguidance

        raw = token_bytes(tok)
        self.tokens, self.special_token_ids, self.by_bytes = [], [], {}
        for i, b in enumerate(raw):
            if b is None or not b:
                name = tok.id_to_special.get(i, f"<[glmkit:{i}]>")
                self.tokens.append(b"\xff" + name.encode("utf-8"))
                self.special_token_ids.append(i)
            else:
                self.tokens.append(b)
                self.by_bytes.setdefault(b, i)
        self.max_len = max(map(len, self.by_bytes))
        self.eos_token_id, self.bos_token_id = stop_ids[0], None
        self.lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(self), n_vocab=len(raw),
                                            eos_token=list(stop_ids))
        self.vocab = len(raw)
        self.quote = [self.by_bytes[b'"']] if b'"' in self.by_bytes else []
        self.brackets = [self.by_bytes[c] for c in (b"}", b"]", b")") if c in self.by_bytes]
        self.alphabet = [self.by_bytes[c] for c in CLOSING_ALPHABET if c in self.by_bytes]
        # for closing (GrammarConstraint._closing): ids without whitespace; those that also open no container
        self.tight_mask = np.array([t[:1] != b"\xff" and not any(c in t for c in b" \n\r\t") for t in self.tokens])
        self.safe_mask = self.tight_mask & np.array([not any(c in t for c in b"{[") for t in self.tokens])

    def __call__(self, s) -> list[int]:
        s = s.encode("utf-8") if isinstance(s, str) else bytes(s)
        out, i = [], 0
        while i < len(s):
            for k in range(min(self.max_len, len(s) - i), 0, -1):
                t = self.by_bytes.get(s[i:i + k])
                if t is not None:
                    out.append(t)
                    i += k
                    break
            else:                                   # a byte no token spells (never for byte-level vocabularies)
                i += 1
        return out


_VOCABS: "weakref.WeakKeyDictionary[Tokenizer, dict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def vocab(tok: Tokenizer, stop_ids: Iterable[int]) -> _Vocab:
    """Built once per tokenizer and stop ids (0.3-1 s for 65k-150k ids)."""
    stops = tuple(dict.fromkeys(int(i) for i in stop_ids))
    if not stops:
        raise ValueError("a grammar constraint needs at least one stop id")
    with _LOCK:
        per = _VOCABS.setdefault(tok, {})
        if stops not in per:
            per[stops] = _Vocab(tok, stops)
        return per[stops]


# ------------------------------------------------------------------------------------------------------------
# Grammars
# ------------------------------------------------------------------------------------------------------------

def _options(strict: bool) -> dict:
    return {"whitespace_pattern": WHITESPACE, "json_allowed_escapes": ESCAPES, "lenient": not strict}


def json_schema_grammar(schema: Optional[dict], strict: bool = False) -> str:
    """A JSON Schema (None: any JSON object) -> an llguidance grammar. strict: unsupported keywords are an
    error instead of being ignored."""
    import llguidance

    if schema is None:
        schema = {"type": "object"}
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_options(strict))


def _lark_json(schema: dict, root: dict, strict: bool) -> str:
    sub = dict(schema)
    for k in ("$defs", "definitions"):
        if k in root and k not in sub:
            sub[k] = root[k]
    sub["x-guidance"] = _options(strict)
    return "%json " + json.dumps(sub, ensure_ascii=False)


def _lark_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _chatglm3_kwargs(params: dict, strict: bool, rule: str) -> list[str]:
    """Rules writing `k=v, ...` for an object schema: the declared properties in order (the required ones
    always), each value under its own schema; a schema without properties takes any identifier keywords."""
    props = params.get("properties") or {}
    if not props:
        return [f"{rule}: ({rule}_kw (\", \" {rule}_kw)*)?",
                f"{rule}_kw: /[A-Za-z_][A-Za-z0-9_]*/ \"=\" %json {{}}"]
    required = set(params.get("required") or [])
    names = [k for k in props if k.isidentifier() and not keyword.iskeyword(k)]
    bad = [k for k in required if k not in names]
    if bad:
        raise GrammarError(f"property {bad[0]!r} cannot be a ChatGLM3 tool-call keyword argument (its calls are "
                           "Python calls: names must be identifiers)")
    rules = []
    n = len(names)
    for i, k in enumerate(names):
        kv = f"{_lark_str(k + '=')} {rule}_v{i}"
        rules.append(f"{rule}_v{i}: {_lark_json(props[k], params, strict)}")
        nxt_first, nxt_rest = f"{rule}_f{i + 1}", f"{rule}_r{i + 1}"
        if k in required:
            rules.append(f"{rule}_f{i}: {kv} {nxt_rest}")
            rules.append(f"{rule}_r{i}: \", \" {kv} {nxt_rest}")
        else:
            rules.append(f"{rule}_f{i}: {kv} {nxt_rest} | {nxt_first}")
            rules.append(f"{rule}_r{i}: \", \" {kv} {nxt_rest} | {nxt_rest}")
    rules.append(f"{rule}_f{n}: \"\"")
    rules.append(f"{rule}_r{n}: \"\"")
    rules.append(f"{rule}: {rule}_f0")
    return rules


def tool_call_grammar(family: str, tools: list[dict], forced: Optional[str], parallel: bool,
                      assistant_id: int, strict: bool = False) -> str:
    """The answer of a forced tool call (forced: the named tool, whose name line the prompt already holds;
    None: tool_choice "required", any of the tools), in the model's own syntax; parallel: up to
    MAX_PARALLEL_CALLS calls, each after an <|assistant|> token as the official format writes them."""
    import llguidance

    if family not in ("chatglm3", "glm4"):
        raise GrammarError(f"{family} has no tool calling")
    rules, alts = [], []
    for j, t in enumerate(tools):
        fn = t["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if family == "glm4":
            rules.append(f"body{j}: {_lark_json(params, params, strict)}")
        else:
            rules += _chatglm3_kwargs(params, strict, f"kw{j}")
            rules.append(f"body{j}: \"```python\\ntool_call(\" kw{j} \")\\n```\"")
        rules.append(f"call{j}: {_lark_str(fn['name'] + chr(10))} body{j}")
        alts.append(j)
    if forced is not None:
        (j,) = [j for j, t in enumerate(tools) if t["function"]["name"] == forced]
        first, more = f"body{j}", f"call{j}"
    else:
        first = more = "anycall"
        rules.append("anycall: " + " | ".join(f"call{j}" for j in alts))
    start = first
    if parallel:
        start += f" (<[{assistant_id}]> {more}){{0,{MAX_PARALLEL_CALLS - 1}}}"
    lark = "start: " + start + "\n" + "\n".join(rules) + "\n"
    return llguidance.LLMatcher.grammar_from_lark(lark)


# ------------------------------------------------------------------------------------------------------------
# Checks (bad input -> a clear error)
# ------------------------------------------------------------------------------------------------------------

def check_schema(schema, where: str) -> None:
    """A JSON Schema object, well-formed (jsonschema's meta-schema check), or GrammarError naming `where`."""
    if not isinstance(schema, dict):
        raise GrammarError(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.path)
        raise GrammarError(f"{where} is not a valid JSON Schema{' at ' + path if path else ''}: {e.message}") from None


def check_strict(schema: dict, where: str, path: str = "") -> None:
    """OpenAI's strict mode: every object lists all its properties as required and sets additionalProperties
    false (so that the answer has exactly the declared shape)."""
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        if schema.get("additionalProperties", True) is not False:
            raise GrammarError(f"{where}{path or ''}: strict mode needs \"additionalProperties\": false on "
                               "every object")
        missing = [k for k in props if k not in (schema.get("required") or [])]
        if missing:
            raise GrammarError(f"{where}{path}: strict mode needs every property in \"required\"; missing "
                               f"{', '.join(map(repr, missing))}")
        for k, v in props.items():
            check_strict(v, where, f"{path}/properties/{k}")
    for key in ("items", "additionalItems"):
        if isinstance(schema.get(key), dict):
            check_strict(schema[key], where, f"{path}/{key}")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for i, v in enumerate(schema.get(key) or []):
            check_strict(v, where, f"{path}/{key}/{i}")
    for key in ("$defs", "definitions"):
        for k, v in (schema.get(key) or {}).items():
            check_strict(v, where, f"{path}/{key}/{k}")


def compile_check(tok: Tokenizer, grammar: str, stop_ids, where: str) -> None:
    """The grammar compiles for this vocabulary (unsupported keywords in strict mode, bad regex patterns, ...)."""
    import llguidance

    err = llguidance.LLMatcher.validate_grammar(grammar, vocab(tok, stop_ids).lltok)
    if err and not err.startswith("WARNING"):
        raise GrammarError(f"{where} cannot be decoded under: {_short(err)}")


def _short(err: str) -> str:
    err = err.split("<state>")[0].split("<backtrace>")[0].strip()
    return re.sub(r"\s+", " ", err)[:400]


def _reserve(schema) -> int:
    """Tokens kept for closing: a few per required property and nesting level of the schema."""
    n = 0
    stack = [schema]
    while stack:
        s = stack.pop()
        if isinstance(s, dict):
            n += 1 + 3 * len(s.get("required") or []) if isinstance(s.get("required"), list) else 1
            stack += list(s.values())
        elif isinstance(s, list):
            stack += s
    return 12 + min(n, 200)


# ------------------------------------------------------------------------------------------------------------
# The constraint the engine runs
# ------------------------------------------------------------------------------------------------------------

class GrammarConstraint:
    """Per generated token: logits = c.mask_logits(logits); sample; c.advance(token) (the engine's hook,
    engine/sequence.py). Stop ids are allowed only where the grammar is complete.

    max_tokens: the answer's budget; once only `reserve` tokens are left the constraint is closing (see the
    module's docstring)."""

    def __init__(self, tok: Tokenizer, grammar: str, stop_ids, *, max_tokens: Optional[int] = None,
                 reserve: int = 24):
        import llguidance

        self.voc = vocab(tok, stop_ids)
        self.stop_ids = list(dict.fromkeys(int(i) for i in stop_ids))
        self.matcher = llguidance.LLMatcher(self.voc.lltok, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {_short(self.matcher.get_error())}")
        self.max_tokens = max_tokens
        self.reserve = min(reserve, max_tokens - max_tokens // 4) if max_tokens else 0
        self.n_tokens = 0
        self._bits = np.zeros((self.voc.vocab + 31) // 32, dtype=np.uint32)

    @property
    def done(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def closing(self) -> bool:
        return self.max_tokens is not None and self.n_tokens >= self.max_tokens - self.reserve

    def allowed_np(self):
        """numpy bool [vocab of the tokenizer]: the ids allowed next. (numpy, single-threaded: on a loaded
        machine PyTorch's intra-op pool made these few element-wise ops cost ~100 ms a token.)"""
        m = self.matcher
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if m.is_error():
            raise ConstraintError(f"grammar error: {_short(m.get_error())}")
        mask = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.voc.vocab].view(bool)
        if self.closing:
            mask = self._closing(mask)
        if not mask.any():
            raise ConstraintError("no token continues the constrained answer")
        return mask

    def _closing(self, mask):
        """Of the allowed ids: a stop id, a quote that closes a string, else the first step of the shortest run
        of one-character tokens (LOOKAHEAD deep) after which a quote is allowed (an e-mail, a date, a pattern
        still to finish), else a lone closing brace/bracket or a quote that opens a string (an empty one
        follows), else the first step of such a run towards one of those, else the ids that hold no whitespace and open no container, else
        those without whitespace."""
        q = [i for i in self.voc.quote if mask[i]]
        opens = bool(q) and self.matcher.validate_tokens(q + q) == 2     # "": the quote opens a string
        first = [i for i in self.stop_ids + ([] if opens else q) if i < len(mask) and mask[i]]
        if not first and self.voc.quote:                 # a string whose format or pattern is still open
            step = self._lookahead(mask, self.voc.quote)
            first = [step] if step is not None else []
        if not first:
            first = [i for i in self.voc.brackets + q if mask[i]]
        if not first:
            step = self._lookahead(mask, self.stop_ids + self.voc.quote + self.voc.brackets)
            first = [step] if step is not None else []
        if first:
            out = np.zeros_like(mask)
            out[first[0]] = True
            return out
        for pref in (self.voc.safe_mask, self.voc.tight_mask):
            sub = mask & pref
            if sub.any():
                return sub
        return mask

    def _lookahead(self, mask, targets) -> Optional[int]:
        alphabet = [i for i in self.voc.alphabet if mask[i]]
        frontier = [[i] for i in alphabet]
        m = self.matcher
        for _ in range(LOOKAHEAD):
            nxt = []
            for seq in frontier:
                for t in targets:
                    if m.validate_tokens(seq + [t]) == len(seq) + 1:
                        return seq[0]
                nxt += [seq + [a] for a in self.voc.alphabet if m.validate_tokens(seq + [a]) == len(seq) + 1]
            frontier = nxt[:96]
        return None

    def allowed(self) -> torch.Tensor:
        """bool [vocab of the tokenizer]: the ids allowed next."""
        return torch.from_numpy(self.allowed_np())

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] (V may exceed the tokenizer's vocabulary: those padding rows are masked) -> a new
        tensor with -inf wherever the token is not allowed."""
        allowed = self.allowed_np()
        n = logits.shape[-1]
        keep = np.zeros(n, dtype=bool)
        k = min(n, allowed.shape[0])
        keep[:k] = allowed[:k]
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            x = logits.detach().numpy().copy()
            x[..., ~keep] = -np.inf
            return torch.from_numpy(x)
        return logits.masked_fill(torch.from_numpy(~keep).to(logits.device), float("-inf"))

    def advance(self, token_id: int) -> None:
        """Accept the sampled id (never a stop id: the engine ends the answer on those)."""
        if not self.matcher.consume_token(int(token_id)):
            raise ConstraintError(f"token {token_id} refused by the grammar: {_short(self.matcher.get_error())}")
        self.n_tokens += 1


def schema_constraint(tok: Tokenizer, schema: Optional[dict], stop_ids, *, strict: bool = False,
                      max_tokens: Optional[int] = None) -> GrammarConstraint:
    """response_format json_schema (schema) / json_object (None)."""
    return GrammarConstraint(tok, json_schema_grammar(schema, strict), stop_ids, max_tokens=max_tokens,
                             reserve=_reserve(schema))


def tool_constraint(tok: Tokenizer, tools: list[dict], forced: Optional[str], stop_ids, *, parallel: bool = True,
                    max_tokens: Optional[int] = None, strict: bool = False) -> GrammarConstraint:
    """A forced tool call (named, or "required": any of tools), arguments under each tool's schema."""
    g = tool_call_grammar(tok.family, tools, forced, parallel, tok.token_id("<|assistant|>"), strict)
    chosen = [t for t in tools if forced is None or t["function"]["name"] == forced]
    reserve = 16 + max(_reserve(t["function"].get("parameters")) for t in chosen)
    return GrammarConstraint(tok, g, stop_ids, max_tokens=max_tokens, reserve=reserve)


# ------------------------------------------------------------------------------------------------------------
# Requests -> constraints (the Pipeline's and the server's)
# ------------------------------------------------------------------------------------------------------------

def response_format_spec(rf) -> Optional[tuple]:
    """OpenAI's response_format -> None (text) or (schema, strict, where); schema None: any JSON object.
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}; {"type": "json_object"};
    {"type": "text"}. GrammarError for anything else."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise GrammarError(f"response_format must be an object, got {type(rf).__name__}")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return None, False, "response_format"
    if kind != "json_schema":
        raise GrammarError(f"response_format type {kind!r} is not supported (use 'text', 'json_object' or "
                           "'json_schema')")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise GrammarError("response_format json_schema needs a 'json_schema' object ({'name', 'schema', "
                           "'strict'})")
    if "schema" not in js:
        raise GrammarError("response_format.json_schema has no 'schema'")
    strict = js.get("strict") or False
    if not isinstance(strict, bool):
        raise GrammarError(f"response_format.json_schema.strict must be a boolean, got {strict!r}")
    where = "response_format.json_schema.schema"
    check_schema(js["schema"], where)
    if strict:
        check_strict(js["schema"], where)
    return js["schema"], strict, where


def check_tools(tools) -> None:
    """Every tool's parameters is a JSON Schema object (or absent), else GrammarError naming the tool."""
    for i, t in enumerate(tools or []):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict):
            continue                                    # the chat format names what is wrong with it
        name = fn.get("name")
        where = f"tools[{i}] ({name!r}) parameters"
        if "parameters" not in fn or fn["parameters"] is None:
            continue
        params = fn["parameters"]
        check_schema(params, where)
        if params.get("type", "object") != "object":
            raise GrammarError(f"{where} must be a JSON Schema of type 'object', got type {params.get('type')!r}")
        if fn.get("strict"):
            check_strict(params, where)


def constraint_for(tok: Tokenizer, stop_ids, *, response_format=None, tools=(), forced: Optional[str] = None,
                   required: bool = False, parallel: Optional[bool] = None,
                   max_tokens: Optional[int] = None) -> Optional[GrammarConstraint]:
    """What a chat request decodes under: a forced tool call (a named tool, or `required`: one of `tools`),
    else the response_format's schema, else nothing (None). GrammarError for a schema that cannot be used."""
    if forced or (required and tools):
        strict = any(t["function"].get("strict") for t in tools)
        c = tool_constraint(tok, list(tools), forced, stop_ids, parallel=bool(required and parallel is not False),
                            max_tokens=max_tokens, strict=strict)
        return c
    spec = response_format_spec(response_format)
    if spec is None:
        return None
    schema, strict, where = spec
    g = json_schema_grammar(schema, strict)
    compile_check(tok, g, stop_ids, where)
    return GrammarConstraint(tok, g, stop_ids, max_tokens=max_tokens, reserve=_reserve(schema))
