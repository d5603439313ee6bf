"""(No longer on the decode path: structured outputs go through llguidance, glmkit/grammar.py. This hand-written
grammar stays as the anchor of benchmarks/grammar.py, (moved out of glmkit/ once nothing there used it).)

Constrained decoding: only tokens that keep the answer a valid prefix of a JSON object (response_format
json_object) or of a ChatGLM3 tool call (a forced tool_choice) get a finite logit.

Two layers.

Validators (character level). A validator is a small pushdown automaton over the characters of the answer:
feed(ch) -> bool accepts one character or refuses it and is then left exactly as it was; done says a complete
value has been written (after that only a little whitespace is accepted); copy() is cheap (every field is
immutable: the container stack is a tuple). Its state_key() is a hashable summary of everything that decides
which texts it accepts next (not the character count), which lets the token layer memoise masks per state.
  JsonObjectValidator    optional leading whitespace, then exactly one RFC 8259 object.
  ChatGLM3CallValidator  "```python\\ntool_call(" kw=VALUE, ... ")\\n```", as ChatGLM3 writes a call after the
                         tool-name line; VALUE is a Python literal in JSON's shape (strings in " or ', numbers,
                         True/False/None, lists, dicts with string keys), so parse_chatglm3_call accepts it.
Numbers are capped at 32 characters plus what they still need and at 3 exponent digits (2 in a call, so that
no argument becomes an infinite float that json.dumps would write as Infinity).
Runs of whitespace are capped (2 between tokens, 4 leading) so that a model cannot loop on whitespace, and the
nesting depth is capped (max_depth). Termination: a soft budget (max_chars, or the token layer's max_tokens)
switches the validator to *closing*: from then on it accepts only characters that finish what is open (a
closing quote, the rest of an escape or a literal, one digit where a number needs one, ":" and the shortest
values where a key was already written, "}" / "]" / ")"), and no whitespace, commas or new containers. Any
state then completes within closing_reserve() characters, so within as many tokens.

Token layer. TokenConstraint(tokenizer, make_validator, stop_ids) masks logits per step. Per tokenizer, once
(cached on a weak dict): the text each id adds when appended to a stream. SentencePiece drops the dummy-prefix
space of the first piece of a decode, so a piece decoded alone is wrong in mid-stream; the contribution is
decode([X, id])[len(decode([X])):] for an anchor X, a plain one-character token ("x") that merges with nothing.
The very first token of an answer really is decoded alone (the server decodes the answer's ids on their own),
so a second table of those texts is used for step 0. Ids whose text is empty or holds U+FFFD (part of a UTF-8
byte sequence), special ids and the pad id are never allowed; stop ids only once the validator is done, and
then they are the only allowed ids.

Mask of one state: the texts are sorted, so all texts with a given prefix form one range, and the sorted list
is walked like a trie. From the validator state the walk tries only the characters that state can take next
(next_chars(): a per-mode superset; feed is the judge) and, for each, finds the sub-range by bisection; ranges
whose first character is refused are never looked at. Where a state accepts a whole class of characters
without changing its structure (plain(): string text, i.e. all but quotes, backslash and control characters;
the characters of a call's keyword name), the texts whose next character is in the class are accepted
wholesale when nothing after it falls outside the class (one vectorised compare against a per-token table of
"last character outside the class"), and only the others are fed one by one (a few hundred in a 65k
vocabulary). Masks are memoised per (grammar, state key); in free text most steps are hits, and a miss costs
1-10 ms for 65k-130k ids (measured worst case, one CPU thread).
ChatGLM-6B's decode also turns <n>, <|tab|>, <|blank_N|> into whitespace across token boundaries:
a token that would complete such a marker begun by earlier text is refused, so the concatenated contributions
always equal tokenizer.decode(ids).
"""
from __future__ import annotations

import keyword
import re
import threading
import weakref
from bisect import bisect_left
from collections import OrderedDict
from typing import Callable, Iterable, Optional

import torch

from glmkit.tokenizer import Tokenizer


class ConstraintError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------------------
# Character-level validators
# ------------------------------------------------------------------------------------------------------------

# modes (what the automaton expects next)
TOP, VALUE, ARR_FIRST, OBJ_FIRST, KEY, COLON, AFTER, STRING, NUMBER, LITERAL, DONE, FIXED, ARGS, IDENT, EQ = \
    range(15)
# number phases (RFC 8259: -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?)
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
_NUMBER_END_OK = (N_ZERO, N_INT, N_FRAC, N_EXP)      # phases where the number may end
# string sub-states: 0 plain text, 1 after a backslash, 2 reading the 4 hex digits of \\u (so far in .lit)
_S_PLAIN, _S_ESC, _S_HEX = 0, 1, 2

_DIGITS = "0123456789"
_HEX = frozenset("0123456789abcdefABCDEF")
_IDENT_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHARS = _IDENT_START | frozenset(_DIGITS)
_MAX_CHAR = chr(0x10FFFF)


class PlainClass:
    """A set of characters as sorted inclusive intervals, and a regex that finds characters outside it."""

    def __init__(self, key: str, intervals, outside: str):
        self.key = key
        self.intervals = tuple(intervals)
        self.outside = re.compile(outside)

    def __contains__(self, ch: str) -> bool:
        return self.outside.match(ch) is None

    @classmethod
    def complement_of(cls, chars: str) -> "PlainClass":
        intervals, start = [], 0
        for c in sorted(set(map(ord, chars))):
            if c > start:
                intervals.append((chr(start), chr(c - 1)))
            start = c + 1
        if start <= 0x10FFFF:
            intervals.append((chr(start), _MAX_CHAR))
        return cls("not " + chars, intervals, "[" + re.escape(chars) + "]")


IDENT_PLAIN = PlainClass("identifier", [("0", "9"), ("A", "Z"), ("_", "_"), ("a", "z")], "[^0-9A-Za-z_]")


class Validator:
    """A JSON-shaped value automaton; subclasses fix the dialect (class attributes) and the outer syntax (TOP).

    Fields (all immutable values, so copy() and the snapshot taken by feed are shallow):
      mode, stack (tuple of 'o' object / 'a' array / 'c' call arguments), ws (whitespace run length),
      sub (number phase / string sub-state / FIXED's next mode), lit (rest of a literal or fixed text; the hex
      digits of a \\u read so far; the number so far), quote (the open string's quote), is_key, ident + used
      (call keyword names), closing, n (characters fed), max_chars, max_depth.
    """

    WS = " \t\n\r"                 # whitespace accepted between tokens
    QUOTES = '"'
    ESCAPES = '"\\/bfnrt'          # after a backslash (besides u)
    LITERALS = {"t": "true", "f": "false", "n": "null"}
    NO_SURROGATES = False          # refuse \\uD800-\\uDFFF
    BANNED_IN_STRING = ""          # printable characters refused inside strings
    WS_CAP = 2
    LEAD_CAP = 4
    CALL_END = ""                  # what follows the ")" of a call (ChatGLM3CallValidator)
    MAX_NUMBER_CHARS = 32          # a number's optional parts stop here (required digits still come)
    MAX_EXP_DIGITS = 3             # |exponent| < 1000

    __slots__ = ("mode", "stack", "ws", "sub", "lit", "quote", "is_key", "ident", "used", "closing", "n",
                 "max_chars", "max_depth")

    def __init__(self, max_chars: Optional[int] = None, max_depth: int = 16):
        self.mode, self.stack, self.ws, self.sub, self.lit = TOP, (), 0, 0, ""
        self.quote, self.is_key, self.ident, self.used = "", False, "", frozenset()
        self.closing, self.n = False, 0
        self.max_chars, self.max_depth = max_chars, max_depth

    # characters that are not plain string content: every other one, inside a string with no escape pending
    # and not closing, is accepted and leaves the state unchanged
    @classmethod
    def string_specials(cls) -> str:
        return cls.QUOTES + "\\" + cls.BANNED_IN_STRING + "".join(map(chr, range(32)))

    @classmethod
    def _string_plain(cls) -> "PlainClass":
        got = cls.__dict__.get("_plain_cache")
        if got is None:
            got = PlainClass.complement_of(cls.string_specials())
            setattr(cls, "_plain_cache", got)
        return got

    # --- public API -----------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.mode == DONE

    def plain(self) -> Optional["PlainClass"]:
        """A class of characters that this state accepts in any number, each leaving the state's structure
        as it is (text in a string; an identifier's characters), or None. The token layer accepts texts made
        of them wholesale and feeds only texts holding other characters."""
        if self.closing:
            return None
        if self.mode == STRING and self.sub == _S_PLAIN:
            return self._string_plain()
        if self.mode == IDENT:
            return IDENT_PLAIN
        return None

    def copy(self) -> "Validator":
        new = object.__new__(type(self))
        for f in Validator.__slots__:
            setattr(new, f, getattr(self, f))
        return new

    def _snapshot(self) -> tuple:
        return (self.mode, self.stack, self.ws, self.sub, self.lit, self.quote, self.is_key, self.ident,
                self.used, self.closing, self.n)

    def _restore(self, s: tuple) -> None:
        (self.mode, self.stack, self.ws, self.sub, self.lit, self.quote, self.is_key, self.ident,
         self.used, self.closing, self.n) = s

    def state_key(self) -> tuple:
        """Everything that decides which texts are accepted next (not n: the budget is checked by callers)."""
        return (self.mode, self.stack, self.ws, self.sub, self.lit, self.quote, self.is_key, self.ident,
                self.used, self.closing)

    def grammar_key(self) -> tuple:
        return (type(self), self.max_depth)

    def check_budget(self) -> None:
        """Enter closing mode (sticky) once max_chars characters have been fed."""
        if not self.closing and self.max_chars is not None and self.n >= self.max_chars:
            self.closing = True

    def start_closing(self) -> None:
        self.closing = True

    def feed(self, ch: str) -> bool:
        """One character; the budget is checked before it. False: refused, state unchanged."""
        snap = self._snapshot()
        self.check_budget()
        if self._step(ch):
            return True
        self._restore(snap)
        return False

    def feed_text(self, text: str) -> bool:
        """A whole piece (one token's text) atomically. The budget is checked once, before the piece (a soft
        budget: the piece may run past it), so a token is judged the same way the mask judged it."""
        snap = self._snapshot()
        self.check_budget()
        for ch in text:
            if not self._step(ch):
                self._restore(snap)
                return False
        return True

    def closing_reserve(self) -> int:
        """An upper bound on the characters (so tokens) needed to finish from any state once closing."""
        return self.max_depth + 16

    def next_chars(self) -> str:
        """A superset of the characters the state may accept next that are not in its plain() class (the
        token walk tries only these, besides the plain class)."""
        m = self.mode
        if m == STRING:
            if self.sub == _S_ESC:
                return self.ESCAPES + "u"
            if self.sub == _S_HEX:
                return "0123456789abcdefABCDEF"
            return self.QUOTES + ("" if self.closing else "\\")
        if m == NUMBER:
            return _DIGITS + ".eE+-" + self.WS + ",]})"
        if m in (LITERAL, FIXED):
            return self.lit[:1]
        if m == IDENT:
            return (" =" if not self.closing else "=" + "".join(sorted(_IDENT_CHARS)))
        if m == DONE:
            return self.WS
        if m == TOP:
            return self.WS + self._top_chars()
        ws = self.WS
        if m in (VALUE, ARR_FIRST):
            return ws + "{[-" + _DIGITS + self.QUOTES + "".join(self.LITERALS) + "]"
        if m == OBJ_FIRST:
            return ws + self.QUOTES + "}"
        if m == KEY:
            return ws + self.QUOTES
        if m == COLON:
            return ws + ":"
        if m == AFTER:
            return ws + ",}])"
        if m == ARGS:
            return ws + ")" + "".join(sorted(_IDENT_START))
        if m == EQ:
            return ws + "="
        return ""

    # --- the automaton ----------------------------------------------------------------------------------------
    def _top_chars(self) -> str:
        raise NotImplementedError

    def _top(self, ch: str) -> bool:
        raise NotImplementedError

    def _step(self, ch: str) -> bool:
        """Advance by one character; may leave a partial change behind when it returns False (feed restores)."""
        m = self.mode
        self.n += 1
        if m == STRING:
            return self._string(ch)
        if m == NUMBER:
            r = self._number(ch)
            if r is not None:
                return r
            self._value_done()                     # the number ended before ch: ch comes after the value
            return self._outside(ch)
        if m == LITERAL or m == FIXED:
            if ch != self.lit[0]:
                return False
            self.lit = self.lit[1:]
            if not self.lit:
                if m == LITERAL:
                    self._value_done()
                else:
                    self.mode, self.ws, self.sub = self.sub, 0, 0
            return True
        if m == IDENT:
            return self._ident(ch)
        return self._outside(ch)

    def _value_done(self) -> None:
        self.mode = AFTER if self.stack else DONE
        self.ws, self.sub, self.lit, self.quote, self.is_key = 0, 0, "", "", False

    def _outside(self, ch: str) -> bool:
        m = self.mode
        if ch in self.WS:
            if m == DONE:
                cap = self.WS_CAP
            elif self.closing:
                return False
            else:
                cap = self.LEAD_CAP if m == TOP else self.WS_CAP
            if self.ws >= cap:
                return False
            self.ws += 1
            return True
        self.ws = 0
        if m == TOP:
            return self._top(ch)
        if m == VALUE or m == ARR_FIRST:
            if m == ARR_FIRST and ch == "]":
                self.stack = self.stack[:-1]
                self._value_done()
                return True
            if self.closing and m == ARR_FIRST:
                return False
            return self._value_start(ch)
        if m == OBJ_FIRST:
            if ch == "}":
                self.stack = self.stack[:-1]
                self._value_done()
                return True
            if self.closing or ch not in self.QUOTES:
                return False
            self.mode, self.sub, self.quote, self.is_key = STRING, _S_PLAIN, ch, True
            return True
        if m == KEY:
            if ch not in self.QUOTES:
                return False
            self.mode, self.sub, self.quote, self.is_key = STRING, _S_PLAIN, ch, True
            return True
        if m == COLON:
            if ch != ":":
                return False
            self.mode = VALUE
            return True
        if m == AFTER:
            top = self.stack[-1]
            if ch == ",":
                if self.closing:
                    return False
                self.mode = KEY if top == "o" else VALUE if top == "a" else ARGS
                return True
            if (top, ch) in (("o", "}"), ("a", "]")):
                self.stack = self.stack[:-1]
                self._value_done()
                return True
            if top == "c" and ch == ")":
                self.stack = self.stack[:-1]
                self.mode, self.lit, self.sub = FIXED, self.CALL_END, DONE
                return True
            return False
        if m == ARGS:
            if ch == ")":
                self.stack = self.stack[:-1]
                self.mode, self.lit, self.sub = FIXED, self.CALL_END, DONE
                return True
            if self.closing or ch not in _IDENT_START:
                return False
            self.mode, self.ident = IDENT, ch
            return True
        if m == EQ:
            if ch != "=":
                return False
            self.mode = VALUE
            return True
        return False                               # DONE: only whitespace

    def _value_start(self, ch: str) -> bool:
        if ch == "{" or ch == "[":
            if self.closing or len(self.stack) >= self.max_depth:
                return False
            self.stack += ("o" if ch == "{" else "a",)
            self.mode = OBJ_FIRST if ch == "{" else ARR_FIRST
            return True
        if ch in self.QUOTES:
            self.mode, self.sub, self.quote, self.is_key = STRING, _S_PLAIN, ch, False
            return True
        if ch == "-":
            if self.closing:
                return False
            self.mode, self.sub, self.lit = NUMBER, N_MINUS, ch
            return True
        if "0" <= ch <= "9":
            self.mode, self.sub, self.lit = NUMBER, N_ZERO if ch == "0" else N_INT, ch
            return True
        word = self.LITERALS.get(ch)
        if word is not None:
            self.mode, self.lit = LITERAL, word[1:]
            return True
        return False

    def _string(self, ch: str) -> bool:
        sub = self.sub
        if sub == _S_PLAIN:
            if ch == self.quote:
                if self.is_key:
                    self.mode, self.ws, self.quote, self.is_key = COLON, 0, "", False
                else:
                    self._value_done()
                return True
            if self.closing:
                return False
            if ch == "\\":
                self.sub = _S_ESC
                return True
            return ch >= " " and ch not in self.BANNED_IN_STRING    # another quote character is plain text
        if sub == _S_ESC:
            if ch == "u":
                self.sub, self.lit = _S_HEX, ""
                return True
            if ch in self.ESCAPES:
                self.sub = _S_PLAIN
                return True
            return False
        # _S_HEX
        if ch not in _HEX:
            return False
        if self.NO_SURROGATES and len(self.lit) == 1 and self.lit in "dD" and ch in "89abcdefABCDEF":
            return False
        self.lit += ch
        if len(self.lit) == 4:
            self.sub, self.lit = _S_PLAIN, ""
        return True

    def _number(self, ch: str) -> Optional[bool]:
        """True: consumed; False: refused; None: the number ended before ch. The number's text is in lit."""
        p = self.sub
        digit = "0" <= ch <= "9"
        if p == N_MINUS or p == N_DOT or p == N_E or p == N_ESIGN:     # a digit is required here
            if digit:
                self.sub = (N_ZERO if ch == "0" else N_INT) if p == N_MINUS else N_FRAC if p == N_DOT else N_EXP
            elif p == N_E and (ch == "+" or ch == "-") and not self.closing:
                self.sub = N_ESIGN
            else:
                return False
            self.lit += ch
            return True
        # a complete number (N_ZERO, N_INT, N_FRAC, N_EXP): continuing is optional
        if self.closing or len(self.lit) >= self.MAX_NUMBER_CHARS:
            return None
        if digit:
            if p == N_ZERO:
                return None                        # 01: refused after the number
            if p == N_EXP:
                exp = self.lit[max(self.lit.rfind("e"), self.lit.rfind("E")) + 1:].lstrip("+-")
                if len(exp) >= self.MAX_EXP_DIGITS:
                    return None
        elif ch == "." and (p == N_ZERO or p == N_INT):
            self.sub = N_DOT
        elif (ch == "e" or ch == "E") and p != N_EXP:
            self.sub = N_E
        else:
            return None
        self.lit += ch
        return True

    def _ident_ok(self) -> bool:
        return not keyword.iskeyword(self.ident) and self.ident not in self.used

    def _ident(self, ch: str) -> bool:
        if ch in _IDENT_CHARS:
            if self.closing and self._ident_ok():
                return False                       # closing: end the name as soon as it is usable
            self.ident += ch
            return True
        if ch != "=" and ch not in self.WS:
            return False
        if not self._ident_ok():                   # a keyword (SyntaxError) or a repeated keyword argument
            return False
        self.used |= {self.ident}
        self.ident = ""
        if ch == "=":
            self.mode, self.ws = VALUE, 0
        else:
            if self.closing:
                return False
            self.mode, self.ws = EQ, 1
        return True


class JsonObjectValidator(Validator):
    """Optional leading whitespace (at most LEAD_CAP), then one JSON object (RFC 8259), then at most WS_CAP
    whitespace characters."""

    __slots__ = ()

    def _top_chars(self) -> str:
        return "{"

    def _top(self, ch: str) -> bool:
        if ch != "{":
            return False
        self.stack, self.mode = ("o",), OBJ_FIRST
        return True


class ChatGLM3CallValidator(Validator):
    """The body of a ChatGLM3 tool call: ```python\\ntool_call(kw=VALUE, ...)\\n``` (up to 2 leading spaces or
    newlines). VALUE: strings in " or ' (escapes \\\\ \\" \\' \\n \\r \\t \\b \\f \\uXXXX, no surrogates: Python
    and JSON read these alike), JSON numbers, True/False/None, lists, dicts with string keys. Keyword names are
    ASCII identifiers, no Python keyword, none repeated; a trailing comma is allowed. Backticks are refused
    inside strings (parse_chatglm3_call splits the body on ```). Spaces only between tokens."""

    __slots__ = ()
    WS = " "
    QUOTES = "\"'"
    ESCAPES = "\"'\\bfnrt"
    LITERALS = {"T": "True", "F": "False", "N": "None"}
    NO_SURROGATES = True
    BANNED_IN_STRING = "`"
    LEAD_CAP = 2
    CALL_START = "```python\ntool_call("
    CALL_END = "\n```"
    MAX_EXP_DIGITS = 2             # json.dumps of the parsed arguments must not meet an infinite float

    def _top_chars(self) -> str:
        return "`\n"

    def _outside(self, ch: str) -> bool:
        # leading newlines too (the model may put the fence on a fresh line); elsewhere spaces only
        if self.mode == TOP and ch == "\n":
            if self.closing or self.ws >= self.LEAD_CAP:
                return False
            self.ws += 1
            return True
        return super()._outside(ch)

    def _top(self, ch: str) -> bool:
        if ch != "`":
            return False
        self.stack = ("c",)
        self.mode, self.lit, self.sub = FIXED, self.CALL_START[1:], ARGS
        return True

    def closing_reserve(self) -> int:
        # the fixed text (20 + 4), a pending string escape (5) and quote, a dict key's ":" and value (<= 5),
        # the closers, ")" and the name being typed (pathological: a name that clashes with earlier ones)
        return self.max_depth + len(self.CALL_START) + len(self.CALL_END) + 24


# ------------------------------------------------------------------------------------------------------------
# Token layer
# ------------------------------------------------------------------------------------------------------------

_MEMO_SIZE = 128


class _Mask:
    """An allowed-ids mask (bool [vocab]) and, per (logits length, device), the padded inverse that
    mask_logits fills with -inf (built once, so a memo hit costs one masked_fill)."""

    __slots__ = ("allowed", "nonempty", "_inv")

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed
        self.nonempty = bool(allowed.any())
        self._inv: dict = {}

    def inverse(self, n: int, device) -> torch.Tensor:
        key = (n, str(device))
        inv = self._inv.get(key)
        if inv is None:
            inv = torch.ones(n, dtype=torch.bool)   # ids past the tokenizer's vocabulary: padding rows
            k = min(n, self.allowed.shape[0])
            inv[:k] = ~self.allowed[:k]
            inv = inv.to(device)
            if len(self._inv) < 4:
                self._inv[key] = inv
        return inv


class _Index:
    """One table of token texts (id -> text or None), sorted for prefix walks, with memoised state masks."""

    def __init__(self, texts: list, vocab: int):
        self.texts = texts
        self.vocab = vocab
        order = sorted((t, i) for i, t in enumerate(texts) if t is not None)
        self.stexts = [t for t, _ in order]
        self.pos_to_id = torch.tensor([i for _, i in order], dtype=torch.long)
        self._outside: dict = {}
        self.memo: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def outside(self, plain: PlainClass):
        """int32 [sorted positions]: the index of the last character outside the plain class (-1: none)."""
        got = self._outside.get(plain.key)
        if got is None:
            rx = plain.outside
            last = []
            for t in self.stexts:
                k = -1
                for mt in rx.finditer(t):
                    k = mt.start()
                last.append(k)
            got = self._outside[plain.key] = torch.tensor(last, dtype=torch.int32)
        return got

    def prefix_range(self, prefix: str) -> tuple[int, int]:
        lo = bisect_left(self.stexts, prefix)
        hi = bisect_left(self.stexts, prefix[:-1] + chr(ord(prefix[-1]) + 1), lo)
        return lo, hi

    def mask_for(self, v: Validator) -> _Mask:
        """The ids whose text v accepts from its current state (closing as of now)."""
        key = (v.grammar_key(), v.state_key())
        with self.lock:
            m = self.memo.get(key)
            if m is not None:
                self.memo.move_to_end(key)
                return m
        m = _Mask(self._compute(v))
        with self.lock:
            self.memo[key] = m
            while len(self.memo) > _MEMO_SIZE:
                self.memo.popitem(last=False)
        return m

    def _compute(self, v: Validator) -> torch.Tensor:
        root = v.copy()
        root.max_chars = None                    # closing is decided at the token start; no change mid-token
        sel = torch.zeros(len(self.stexts), dtype=torch.bool)
        picked: list[int] = []
        self._walk(root, 0, len(self.stexts), 0, "", sel, picked)
        if picked:
            sel[torch.tensor(picked, dtype=torch.long)] = True
        mask = torch.zeros(self.vocab, dtype=torch.bool)
        mask[self.pos_to_id[sel]] = True
        return mask

    def _walk(self, s: Validator, lo: int, hi: int, d: int, prefix: str, sel, picked) -> None:
        """Sorted positions [lo, hi) all start with prefix (d characters), which s has been fed: mark the
        accepted ones (sel for ranges, picked for single positions)."""
        st = self.stexts
        i = lo
        while i < hi and len(st[i]) == d:      # texts equal to the prefix sort first
            picked.append(i)
            i += 1
        if i >= hi:
            return
        plain = s.plain()
        if plain is not None:
            # texts whose character d is plain: accepted wholesale when nothing after d is outside the class;
            # the few others are fed one by one
            last_t = self.outside(plain)
            for a, b in plain.intervals:
                ra = bisect_left(st, prefix + a, i, hi)
                rb = hi if b == _MAX_CHAR else bisect_left(st, prefix + chr(ord(b) + 1), ra, hi)
                if ra >= rb:
                    continue
                seg = last_t[ra:rb]
                sel[ra:rb] |= seg < d
                for p in (seg > d).nonzero().flatten().tolist():
                    t = st[ra + p]
                    s2 = s.copy()
                    if all(s2._step(c) for c in t[d:]):
                        picked.append(ra + p)
        for c in s.next_chars():
            if plain is not None and c in plain:
                continue
            p2 = prefix + c
            a = bisect_left(st, p2, i, hi)
            if a >= hi or not st[a].startswith(p2):
                continue
            b = bisect_left(st, prefix + chr(ord(c) + 1), a, hi)
            s2 = s.copy()
            if s2._step(c):
                self._walk(s2, a, b, d + 1, p2, sel, picked)


class _VocabTables:
    """Per tokenizer: the texts tokens add mid-stream (anchored) and at the start of an answer."""

    def __init__(self, tok: Tokenizer):
        self.vocab = int(tok.vocab_size)
        banned = set(tok.special_ids)
        pad = getattr(tok, "pad_id", None)
        if pad is not None:
            banned.add(int(pad))
        self.banned = banned
        self.anchor, base = _find_anchor(tok)
        dec = tok.decode
        texts: list = []
        for i in range(self.vocab):
            if i in banned:
                texts.append(None)
                continue
            s = dec([self.anchor, i])
            texts.append(_usable(s[len(base):]) if s.startswith(base) else None)
        self.texts = texts
        self.index = _Index(texts, self.vocab)
        self._start: Optional[_Index] = None
        self._tok = weakref.ref(tok)
        self.markers = _markers(tok)
        self.lock = threading.Lock()

    def start_index(self) -> _Index:
        """Texts of ids decoded alone (the first token of an answer). SentencePiece differs from the anchored
        text only by the dummy-prefix space it drops, so only texts starting with whitespace are re-decoded."""
        with self.lock:
            if self._start is None:
                tok = self._tok()
                texts = list(self.texts)
                for i, t in enumerate(texts):
                    if t is not None and t[0].isspace():
                        texts[i] = _usable(tok.decode([i]))
                self._start = _Index(texts, self.vocab)
            return self._start


def _usable(text: str) -> Optional[str]:
    return text if text and "\ufffd" not in text else None


def _find_anchor(tok: Tokenizer) -> tuple[int, str]:
    """A token that decodes to one plain ASCII letter alone; appending to it shows the mid-stream text."""
    for ch in "xqza":
        ids = tok.encode_plain(ch)
        if len(ids) == 1 and tok.decode(ids) == ch:
            return ids[0], ch
    raise ConstraintError(f"no single-letter anchor token in the {tok.family} vocabulary")


def _markers(tok: Tokenizer) -> list[str]:
    """Texts a tokenizer's decode rewrites as a whole (ChatGLM-6B: <n>, <|tab|>, <|blank_N|>); they must not
    form across token boundaries, or the per-token texts would not add up to decode(ids)."""
    post = getattr(tok, "_post", None)
    if post is None or getattr(tok, "partial_marker", None) is None:
        return []
    cands = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(1, 100)]
    return [m for m in cands if post(m) != m]


_TABLES: "weakref.WeakKeyDictionary[Tokenizer, _VocabTables]" = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def vocab_tables(tok: Tokenizer) -> _VocabTables:
    """Built once per tokenizer object (about 0.3-0.6 s per 65k ids)."""
    with _TABLES_LOCK:
        t = _TABLES.get(tok)
        if t is None:
            t = _TABLES[tok] = _VocabTables(tok)
        return t


def prepare(tokenizer: Tokenizer, *validators: type) -> None:
    """Build the tables a tokenizer needs ahead of the first request (else the first constrained steps pay
    for them: about 1 s for a 65k vocabulary, 2 s for 130k)."""
    tables = vocab_tables(tokenizer)
    for index in (tables.index, tables.start_index()):
        for cls in validators:
            index.outside(cls._string_plain())
            if issubclass(cls, ChatGLM3CallValidator):
                index.outside(IDENT_PLAIN)


class TokenConstraint:
    """Per generated token: logits = c.mask_logits(logits); sample; c.advance(token).

    tokenizer        a glmkit Tokenizer
    make_validator   () -> Validator, e.g. JsonObjectValidator or functools.partial(..., max_chars=...)
    stop_ids         allowed only once the validator is done, and then the only ids allowed
    at_start         the first token is the first of the decoded text (SentencePiece drops its leading space)
    max_tokens       with it, closing starts once only closing_reserve() tokens are left, so a complete value
                     fits in max_tokens tokens when max_tokens >= closing_reserve() (+1 for the stop id)
    """

    def __init__(self, tokenizer: Tokenizer, make_validator: Callable[[], Validator], stop_ids: Iterable[int],
                 *, at_start: bool = True, max_tokens: Optional[int] = None):
        self.tok = tokenizer
        self.validator = make_validator()
        self.stop_ids = sorted({int(i) for i in stop_ids})
        if not self.stop_ids:
            raise ValueError("TokenConstraint needs at least one stop id (the only ids allowed once done)")
        self.tables = vocab_tables(tokenizer)
        self.at_start = at_start
        self.max_tokens = max_tokens
        self.n_tokens = 0
        self.pieces: list[str] = []
        self._tail = ""                          # the last characters of the text (marker checks)
        self.finished = False                    # a stop id was accepted
        stop = torch.zeros(self.tables.vocab, dtype=torch.bool)
        stop[[i for i in self.stop_ids if i < self.tables.vocab]] = True
        self._stop_mask = _Mask(stop)

    @property
    def done(self) -> bool:
        return self.validator.done

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def _index(self) -> _Index:
        if self.at_start and self.n_tokens == 0:
            return self.tables.start_index()
        return self.tables.index

    def _sync_budget(self) -> None:
        v = self.validator
        if self.max_tokens is not None and self.n_tokens >= self.max_tokens - v.closing_reserve():
            v.start_closing()
        v.check_budget()

    def _marker_ban(self, index: _Index) -> Optional[list[int]]:
        """Ids that would complete a whitespace marker begun by the text so far (ChatGLM-6B)."""
        if not self.tables.markers:
            return None
        k = self._tail.rfind("<")
        if k < 0:
            return None
        part = self._tail[k:]
        ids: list[int] = []
        for m in self.tables.markers:
            if len(m) > len(part) and m.startswith(part):
                lo, hi = index.prefix_range(m[len(part):])
                ids += index.pos_to_id[lo:hi].tolist()
        return ids

    def _mask(self) -> _Mask:
        if self.finished:
            raise ConstraintError("the constrained answer already ended with a stop id")
        if self.validator.done:
            return self._stop_mask
        self._sync_budget()
        index = self._index()
        m = index.mask_for(self.validator)
        ban = self._marker_ban(index)
        if ban:
            allowed = m.allowed.clone()
            allowed[ban] = False
            m = _Mask(allowed)
        if not m.nonempty:
            raise ConstraintError(f"no token of the vocabulary continues {self.text[-40:]!r}")
        return m

    def allowed(self) -> torch.Tensor:
        """bool [vocab of the tokenizer]: the ids allowed next (do not modify it: masks are shared)."""
        return self._mask().allowed

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] (V may exceed the tokenizer's vocabulary: those padding rows are masked) -> a new
        tensor with -inf wherever the token is not allowed."""
        inv = self._mask().inverse(logits.shape[-1], logits.device)
        return logits.masked_fill(inv, float("-inf"))

    def advance(self, token_id: int) -> str:
        """Accept the sampled id; returns the text it added. Raises ConstraintError for an id the mask refused."""
        token_id = int(token_id)
        if self.finished:
            raise ConstraintError("the constrained answer already ended with a stop id")
        if self.validator.done:
            if token_id not in self.stop_ids:
                raise ConstraintError(f"token {token_id} after a complete value (only stop ids are allowed)")
            self.finished = True
            return ""
        if token_id in self.stop_ids:
            raise ConstraintError(f"stop id {token_id} before the value is complete ({self.text[-40:]!r})")
        self._sync_budget()
        index = self._index()
        text = index.texts[token_id] if 0 <= token_id < len(index.texts) else None
        if text is None:
            raise ConstraintError(f"token {token_id} is never allowed (special, empty or a partial character)")
        ban = self._marker_ban(index)
        if ban and token_id in ban:
            raise ConstraintError(f"token {token_id} ({text!r}) would complete a whitespace marker")
        if not self.validator.feed_text(text):
            raise ConstraintError(f"token {token_id} ({text!r}) does not continue {self.text[-40:]!r}")
        self.n_tokens += 1
        self.pieces.append(text)
        self._tail = (self._tail + text)[-16:]
        return text


def json_object_constraint(tokenizer: Tokenizer, stop_ids: Iterable[int], max_tokens: Optional[int] = None,
                           **kw) -> TokenConstraint:
    """response_format {"type": "json_object"}."""
    return TokenConstraint(tokenizer, JsonObjectValidator, stop_ids, max_tokens=max_tokens, **kw)


def chatglm3_call_constraint(tokenizer: Tokenizer, stop_ids: Iterable[int], max_tokens: Optional[int] = None,
                             **kw) -> TokenConstraint:
    """A forced ChatGLM3 tool call: the answer after the tool-name line the prompt already holds."""
    return TokenConstraint(tokenizer, ChatGLM3CallValidator, stop_ids, max_tokens=max_tokens, **kw)
