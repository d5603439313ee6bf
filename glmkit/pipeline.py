"""load() and the Pipeline that the CLI and the server share: where text meets tokens.

    pipe = glmkit.load("path/to/chatglm3-6b")
    pipe.chat([{"role": "user", "content": "你好"}])            # -> ChatResponse (a str; .tool_calls)
    for piece in pipe.stream_chat("你好"): print(piece, end="")
    pipe.chat("列出三种水果", response_format={"type": "json_object"}, logprobs=True, top_logprobs=3)

The Pipeline drives the engine (glmkit/engine) with one slot on the caller's thread; the server drives another
engine on the same model with many slots on its worker thread. Each engine has its own KV cache and prefix
cache, so neither can reuse the other's keys/values.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from .chat_format import ChatResponse, Prompt, render_within
from .checkpoint import CheckpointError, load_model
from .config import FAMILY_NAMES
from .engine import ContextOverflow, Engine, GenerationStats
from .model import SeqState
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

NO_MODEL_HELP = """\
glmkit needs a model folder. Official weights are published on Hugging Face by THUDM (Tsinghua KEG / Zhipu AI):
THUDM/chatglm3-6b, THUDM/chatglm2-6b, THUDM/chatglm-6b, THUDM/glm-4-9b-chat (or glm-4-9b-chat-hf). Download one
on a machine with internet access, for example with `huggingface-cli download THUDM/chatglm3-6b --local-dir
~/models/chatglm3-6b` (or `git clone https://huggingface.co/THUDM/chatglm3-6b` with git-lfs), copy the folder
here and run `glmkit chat --model ~/models/chatglm3-6b`. glmkit reads the folder as published (config.json,
tokenizer files, *.bin or *.safetensors shards) and never runs the Python code inside it."""

DEFAULT_CTX = 8192          # cache positions allocated unless --ctx says otherwise (capped by the model)


class NoModelError(RuntimeError):
    pass


class StopStringFilter:
    """Text in, text out; cuts at the first user stop string of the whole text, also one that arrives split
    across pieces. Holds back only text from the earliest place where a stop string could still begin."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped = False

    def _first_match(self) -> int:
        return min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)

    def _first_possible_start(self) -> int:
        """Earliest j such that buf[j:] is a proper prefix of a stop string (it may still become one)."""
        n = len(self.buf)
        longest = max(len(s) for s in self.stops)
        for j in range(max(0, n - longest + 1), n):
            tail = self.buf[j:]
            if any(len(tail) < len(s) and s.startswith(tail) for s in self.stops):
                return j
        return n

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        if self.stopped:
            return ""
        self.buf += text
        hit, hold = self._first_match(), self._first_possible_start()
        if hit >= 0 and hit <= hold:           # nothing earlier can still turn into a stop string
            out, self.buf, self.stopped = self.buf[:hit], "", True
            return out
        cut = min(hold, hit) if hit >= 0 else hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def flush(self) -> str:
        """End of text: what is held back, cut at a stop string if one is there."""
        if self.stopped or not self.stops:
            out, self.buf = ("" if self.stopped else self.buf), ""
            return out
        hit = self._first_match()
        out = self.buf[:hit] if hit >= 0 else self.buf
        self.stopped = hit >= 0
        self.buf = ""
        return out


class AnswerText:
    """Token ids of one answer -> final text pieces: the chat format's parser (content + tool calls) or, for raw
    completions, the incremental detokenizer; then the user's stop strings. Shared by ChatRun and the server."""

    def __init__(self, tokenizer: Tokenizer, prompt: Prompt, stops: Sequence[str], raw: bool = False):
        self.parser = None if raw else tokenizer.chat_format.parser(prompt)
        self.decoder = tokenizer.decoder() if raw else None
        self.stops = StopStringFilter(stops)
        self.text = ""                            # everything given out so far

    @property
    def stopped(self) -> bool:
        """A stop string was reached: nothing more comes out (the caller should stop generating)."""
        return self.stops.stopped

    def feed(self, token_id: int) -> str:
        if self.stopped:
            return ""
        piece = self.decoder.push(token_id) if self.decoder else self.parser.feed(token_id)
        out = self.stops.push(piece) if piece else ""
        self.text += out
        return out

    def finish(self) -> str:
        """End of the answer: what the detokenizer / parser / stop filter still hold."""
        if self.stopped:
            return ""
        tail = self.decoder.flush() if self.decoder else self.parser.finish()
        out = (self.stops.push(tail) if tail else "") + self.stops.flush()
        self.text += out
        return out

    def tool_events(self) -> list:
        """Tool-call events since the last call (see ResponseParser.events), for streaming."""
        if self.parser is None or not self.parser.events:
            return []
        ev, self.parser.events = self.parser.events, []
        return ev

    @property
    def tool_calls(self) -> list:
        return [] if (self.parser is None or self.stopped) else self.parser.tool_calls


def logprob_entry(tokenizer: Tokenizer, token_id: int, logprob: float, alternatives) -> dict:
    """One token's logprobs in OpenAI's shape: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}."""
    def one(i, v):
        t = tokenizer.decode([i], skip_special_tokens=False)
        return {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
    d = one(token_id, logprob)
    d["top_logprobs"] = [one(i, v) for i, v in alternatives]
    return d


def usage_of(st: GenerationStats) -> dict:
    """OpenAI's usage block, with the prompt tokens that came from a cache."""
    return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.new_tokens,
            "total_tokens": st.prompt_tokens + st.new_tokens,
            "prompt_tokens_details": {"cached_tokens": st.reused_tokens}}


class ChatRun:
    """One answer being generated: iterate for text pieces; .response (ChatResponse) once finished."""

    def __init__(self, pipe: "Pipeline", prompt: Prompt, params: SamplingParams, raw: bool = False,
                 state: Optional[SeqState] = None, constraint=None, logprobs: Optional[int] = None,
                 stop_ids: Optional[Sequence[int]] = None):
        self.pipe, self.prompt, self.params = pipe, prompt, params
        self.answer = AnswerText(pipe.tokenizer, prompt, params.stop, raw)
        stops = pipe.tokenizer.chat_format.stop_ids if stop_ids is None else stop_ids
        self.tokens = pipe.engine.generate(prompt.ids, params, stops, state,
                                           constraint=constraint, logprobs=logprobs)
        self.want_logprobs = logprobs is not None
        self.response: Optional[ChatResponse] = None
        self._it = self._run()

    @property
    def stats(self) -> GenerationStats:
        return self.tokens.stats

    @property
    def text(self) -> str:
        return self.answer.text

    def __iter__(self) -> Iterator[str]:
        return self._it

    def _run(self):
        ans = self.answer
        finished = False
        try:
            for tok in self.tokens:
                out = ans.feed(tok)
                if out:
                    yield out
                if ans.stopped:
                    self.tokens.close("stop")
                    break
            out = ans.finish()
            if out:
                yield out
            finished = True
        finally:
            if not finished and not ans.stopped:
                self.tokens.close("cancelled")
            self._finalize()

    def _finalize(self):
        st = self.tokens.stats
        ans = self.answer
        calls = ans.tool_calls
        reason = "tool_calls" if calls else "stop" if ans.stopped else st.finish_reason or "stop"
        self.response = ChatResponse(ans.text, calls, reason, usage_of(st))
        if self.want_logprobs:
            tok = self.pipe.tokenizer
            self.response.logprobs = [logprob_entry(tok, i, v, alts) for i, v, alts in self.tokens.logprobs]
        self.pipe.last_stats = st

    def result(self) -> ChatResponse:
        for _ in self._it:
            pass
        return self.response


class Infilled(str):
    """infill()'s completed text (a str), with .spans (the text generated for each mask, left to right) and
    .stats (each span's GenerationStats)."""

    spans: list
    stats: list

    def __new__(cls, text: str, spans, stats):
        s = super().__new__(cls, text)
        s.spans, s.stats = list(spans), list(stats)
        return s


MASK_TEXT = re.compile(r"(\[(?:MASK|sMASK|gMASK)\])")


class InfillPlan:
    """The rounds of filling every mask of a text, left to right, with a blank-filling GLM, whoever runs the
    generations (Pipeline.infill on its engine, the server on its worker thread):

        next() -> (prompt ids, SeqState) for the leftmost mask still open, or None once all are filled
        fill(span_ids, span_text) puts the generated span in its place; .text, .spans; .stops: the stop ids

    ChatGLM-6B: each round encodes the text so far (spans filled in, the remaining masks as mask tokens) + <sop>;
    encoded apart, the filled-in text before the mask gives the mask's index exactly (the same ids as encoding
    the whole text: encode() starts each piece after a special token without a dummy prefix), and the SeqState
    is explicit because model.sequence_state would pick the first [gMASK] / [MASK] instead.
    Original GLM: [CLS] text <|endoftext|> <|startofpiece|>, the span at the first remaining mask (block positions
    1, 2, ...); its tokens then replace that mask token, as GLM's own generation scripts splice them. In the
    text, the whitespace the tokenizer drops next to a mask is dropped once where the span brings its own."""

    def __init__(self, tokenizer: Tokenizer, cfg, text: str):
        if not cfg.prefix_lm:
            name = FAMILY_NAMES.get(cfg.family, cfg.family)
            raise ValueError(f"infilling needs a blank-filling GLM (the original GLM or ChatGLM-6B: prefix "
                             f"attention, 2D positions); {name} is causal and only continues text: use generate or chat")
        self.tok, self.glm = tokenizer, cfg.family == "glm"
        self.parts = MASK_TEXT.split(text)                 # text, mask, text, mask, ..., text
        if len(self.parts) == 1:
            raise ValueError("the text has no [MASK], [sMASK] or [gMASK] to fill (to continue a text, use "
                             "generate, or end the text with [gMASK])")
        self.k, self.text, self.spans = 1, self.parts[0], []
        self.stops = list(tokenizer.chat_format.stop_ids)
        if self.glm:
            # glm-10b-chinese's [gMASK] is a copy of <|endofpiece|> (GLM issue #55; its config bans it as
            # bad_words_id): generated, it ends the span as <|endofpiece|> does
            self.stops += [int(i) for i in cfg.extra.get("bad_words_id") or []]
            self.ids = tokenizer.encode(text)

    def _mask_index(self) -> int:
        return next(i for i, t in enumerate(self.ids) if t in self.tok.mask_ids)

    def next(self) -> Optional[tuple[list[int], SeqState]]:
        if self.k >= len(self.parts):
            return None
        tok = self.tok
        if self.glm:
            ids = self.ids + [tok.special["<|startofpiece|>"]]
            return ids, SeqState(torch.tensor([len(self.ids)]), torch.tensor([self._mask_index()]))
        head = tok.encode(self.text, add_special_tokens=False)
        ids = head + tok.encode("".join(self.parts[self.k:]))
        return ids, SeqState(torch.tensor([len(ids) - 1]), torch.tensor([len(head)]))   # context ends at <sop>

    def fill(self, span_ids: Sequence[int], span_text: str) -> None:
        if self.glm:
            m = self._mask_index()
            self.ids = self.ids[:m] + [int(t) for t in span_ids if t not in self.stops] + self.ids[m + 1:]
            if span_text[:1].isspace():
                self.text = self.text.rstrip()
        self.spans.append(span_text)
        self.text += span_text + self.parts[self.k + 1]
        self.k += 2


class Pipeline:
    """A loaded model with its tokenizer and chat format; one generation at a time (an engine with one slot)."""

    def __init__(self, model, tokenizer: Tokenizer, path: Optional[Path] = None, ctx: Optional[int] = None,
                 defaults: Optional[dict] = None, cache_mb: Optional[float] = None, ptuning=None,
                 adapter: Optional[Path] = None, layout: Optional[str] = None):
        """ptuning: a P-tuning v2 prefix (keys/values [layers, 2, G, P, D]) in front of every sequence;
        adapter: the folder it (or a LoRA inside the model) came from."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.path = Path(path) if path else None
        self.chat_format = tokenizer.chat_format
        max_seq = min(ctx or DEFAULT_CTX, model.config.max_seq_len)
        self.ptuning, self.adapter, self.layout = ptuning, adapter, layout
        self.named_adapters: dict = {}            # name -> folder (LoRAs chosen per request, add_adapter)
        self.engine = Engine(model, max_seq, slots=1, cache_mb=cache_mb, ptuning=ptuning)
        self.defaults = dict(self.chat_format.defaults)
        self.defaults.update(defaults or {})
        self.last_stats: Optional[GenerationStats] = None

    @property
    def ctx(self) -> int:
        return self.engine.max_seq

    @property
    def device(self):
        return self.model.device

    def add_adapter(self, name: str, folder) -> None:
        """Load a LoRA adapter into the model beside the base, by name: an engine sequence with adapter=name
        (a server request for model `name`) uses it, every other one the bare base (adapters are unmerged and
        applied per batch row)."""
        from .adapters import AdapterError, adapter_kind
        from .adapters.lora import set_active
        from .adapters.peft_format import load_peft_lora
        if self.adapter is not None:
            raise AdapterError(f"this model was loaded with --adapter {self.adapter}: named adapters go beside the "
                               "bare base only")
        if adapter_kind(folder) != "lora":
            raise AdapterError(f"{folder} is a P-tuning v2 adapter: only LoRA adapters can be served by name beside "
                               "the base (serve a P-tuning adapter on its own: --adapter DIR)")
        load_peft_lora(self.model, Path(folder).expanduser(), self.layout, name=name)
        set_active(self.model, None)              # requests for the base get the base
        self.named_adapters[name] = Path(folder)

    @torch.inference_mode()
    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits [T, V] of one full forward over ids (no KV cache), through the adapter when one is loaded."""
        x = torch.tensor([list(ids)], device=self.device)
        if self.ptuning is None:
            return self.model(x)[0]
        from .adapters.ptuning import PrefixKV
        return self.model(x, PrefixKV(self.ptuning, 1), cache_pos=torch.arange(x.shape[1], device=self.device)[None])[0]

    # --- parameters --------------------------------------------------------------------------------------
    def sampling_params(self, **kw) -> SamplingParams:
        kw = {k: v for k, v in kw.items() if v is not None}
        if "max_tokens" in kw:
            kw["max_new_tokens"] = kw.pop("max_tokens")
        if kw.pop("do_sample", True) is False:
            kw["temperature"] = 0.0
        merged = {**self.defaults, **kw}
        known = set(SamplingParams.__dataclass_fields__)
        unknown = sorted(set(merged) - known)
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return SamplingParams(**merged).validate()

    def prompt_budget(self, params: SamplingParams) -> int:
        """Prompt tokens a chat may use: the context less room for the answer (history is trimmed to fit)."""
        want = params.max_new_tokens or min(1024, self.ctx // 4)
        return self.ctx - min(want, self.ctx // 2)

    def constraint_for(self, response_format, prompt: Prompt, params: SamplingParams, tool_choice=None,
                       parallel_tool_calls: Optional[bool] = None):
        """Structured outputs (glmkit/grammar.py): a forced tool call (tool_choice naming a function, or
        "required") under the tools' own parameter schemas, else response_format {"type": "json_object"} or
        {"type": "json_schema", "json_schema": {"schema", "strict"}} -> a constraint for the engine, or None.
        A schema that cannot be used raises grammar.GrammarError (a ValueError)."""
        required = tool_choice == "required"
        if response_format is None and not prompt.forced_tool and not (required and prompt.tools):
            return None
        from . import grammar
        return grammar.constraint_for(self.tokenizer, self.chat_format.stop_ids, response_format=response_format,
                                      tools=prompt.tools, forced=prompt.forced_tool, required=required,
                                      parallel=parallel_tool_calls, max_tokens=params.max_new_tokens)

    @staticmethod
    def _response_format(response_format, schema, json_mode: bool):
        """Pipeline's shortcuts: schema=DICT (a JSON Schema) or json=True (any JSON object)."""
        if schema is not None:
            return {"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}
        if json_mode:
            return {"type": "json_object"}
        return response_format

    # --- chat --------------------------------------------------------------------------------------------
    def start_chat(self, messages, tools=None, tool_choice=None, response_format=None, logprobs: bool = False,
                   top_logprobs: Optional[int] = None, schema: Optional[dict] = None, json: bool = False,
                   parallel_tool_calls: Optional[bool] = None, allow_special: bool = False, **sampling) -> ChatRun:
        """The answer as a ChatRun (iterate it for text pieces). schema=DICT: the answer is JSON valid under
        that JSON Schema; json=True (or response_format {"type": "json_object"}): a JSON object; response_format
        {"type": "json_schema", ...} as OpenAI's; tool_choice naming a function or "required": a call whose
        arguments follow the tool's parameters schema. logprobs: .response.logprobs gets each token's logprob
        and its top_logprobs most likely alternatives (OpenAI's entries), of the model's distribution before
        sampling settings. Texts inside messages are encoded as text (special-token text in them stays text)
        unless allow_special=True, which encodes them as the official code does."""
        params = self.sampling_params(**sampling)
        if tools:
            from .grammar import check_tools
            check_tools(tools)
        prompt = render_within(self.chat_format, messages, self.prompt_budget(params), tools=tools,
                               tool_choice=tool_choice, allow_special=allow_special)
        constraint = self.constraint_for(self._response_format(response_format, schema, json), prompt, params,
                                         tool_choice, parallel_tool_calls)
        return ChatRun(self, prompt, params, constraint=constraint,
                       logprobs=(top_logprobs or 0) if logprobs or top_logprobs else None)

    def chat(self, messages, tools=None, tool_choice=None, **options) -> ChatResponse:
        """messages (OpenAI-style dicts, or one string) -> the answer (a str with .tool_calls, .usage; .logprobs
        when asked for). Options: sampling (temperature, top_p, max_tokens, seed, stop...), response_format,
        logprobs, top_logprobs, allow_special (see start_chat)."""
        return self.start_chat(messages, tools, tool_choice, **options).result()

    def stream_chat(self, messages, tools=None, tool_choice=None, **options) -> Iterator[str]:
        """Like chat(), yielding text pieces as they are generated (tool calls: see start_chat().response)."""
        return iter(self.start_chat(messages, tools, tool_choice, **options))

    # --- raw completion ----------------------------------------------------------------------------------
    def start_generate(self, prompt, logprobs: Optional[int] = None, schema: Optional[dict] = None,
                       json: bool = False, response_format=None, **sampling) -> ChatRun:
        """logprobs: None, or k >= 0 alternatives per token (.response.logprobs); schema / json /
        response_format: the continuation is JSON under the schema, as in start_chat."""
        params = self.sampling_params(**sampling)
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode_for_generation(prompt)
        if len(ids) >= self.ctx:
            raise ContextOverflow(f"prompt of {len(ids)} tokens does not fit the context window of {self.ctx}")
        p = Prompt(ids=ids)
        constraint = self.constraint_for(self._response_format(response_format, schema, json), p, params)
        return ChatRun(self, p, params, raw=True, logprobs=logprobs, constraint=constraint)

    def generate(self, prompt, beams: int = 1, **sampling) -> str:
        """Continue raw text (the tokenizer's special tokens added as its encode() does) -> new text.
        beams > 1: the best of beam_search (its options: length_penalty, no_repeat_ngram_size, min_gen_length)."""
        if beams > 1:
            return self.beam_search(prompt, beams, **sampling)[0]
        return self.start_generate(prompt, **sampling).result()

    def beam_search(self, prompt, num_beams: int = 4, max_new_tokens: Optional[int] = None,
                    length_penalty: float = 1.0, no_repeat_ngram_size: int = 0, min_gen_length: int = 0,
                    sample: bool = False, seed: Optional[int] = None, state: Optional[SeqState] = None,
                    max_tokens: Optional[int] = None) -> list:
        """GLM-130B's BeamSearchStrategy (engine/beam.py) on this model -> up to num_beams BeamText (a str with
        .tokens, .score, .ended), best first. Stops at the format's stop ids; max_new_tokens default 256
        (generate.sh's out-seq-length), within the context."""
        from .engine.beam import BeamParams, CachedStep, beam_search
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt)
        room = self.ctx - len(ids) - 1
        if room < 1:
            raise ContextOverflow(f"prompt of {len(ids)} tokens does not fit the context window of {self.ctx}")
        n = min(room, max_new_tokens or max_tokens or 256)
        params = BeamParams(num_beams, length_penalty, no_repeat_ngram_size, min_gen_length,
                            tuple(self.chat_format.stop_ids), sample)
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        beams = beam_search(CachedStep(self.model, ids, num_beams, n, state), ids, n, params, gen)
        return [BeamText(self.tokenizer.decode(b.tokens), b.tokens, b.score, b.ended) for b in beams]

    def stream_generate(self, prompt, **sampling) -> Iterator[str]:
        return iter(self.start_generate(prompt, **sampling))

    # --- blank infilling (original GLM, ChatGLM-6B) --------------------------------------------------------
    def infill(self, text: str, **sampling) -> Infilled:
        """Fill every [MASK] (short span), [sMASK] (sentence) and [gMASK] (long/suffix) of text, left to right
        -> the text with each mask replaced by its span (an Infilled: .spans, .stats).

        One generation per mask (InfillPlan builds each round's prompt), each span generated at its own mask's
        position until <eop> / <|endofpiece|>. Sampling options as generate() (max_new_tokens per span); greedy
        unless temperature or do_sample is given, as GLM's examples (transformers' generate()) fill blanks.
        """
        if self.config.mask_positions_1d:
            return self._fill_blanks_130b(text, **sampling)
        if sampling.pop("beams", 1) > 1:
            raise ValueError("beam search fills blanks on GLM-130B only (generate.py's BeamSearchStrategy); "
                             "use sampling options here, or Pipeline.beam_search for a continuation")
        plan = InfillPlan(self.tokenizer, self.config, text)
        if sampling.get("temperature") is None and not sampling.get("do_sample"):
            sampling["temperature"] = 0.0
        params = self.sampling_params(**sampling)
        stats = []
        while (step := plan.next()) is not None:
            ids, state = step
            if len(ids) >= self.ctx:
                raise ContextOverflow(f"prompt of {len(ids)} tokens does not fit the context window of {self.ctx}")
            run = ChatRun(self, Prompt(ids=ids), params, raw=True, state=state, stop_ids=plan.stops)
            span = run.result()
            plan.fill(run.tokens.seq.ids[len(ids):], str(span))
            stats.append(run.stats)
        return Infilled(plan.text, plan.spans, stats)

    # --- multiple choice ---------------------------------------------------------------------------------
    def score_choices(self, context: str, choices: Sequence[str], length_normalize: bool = False) -> list[float]:
        """The summed log-probability of each choice's tokens (divided by their number with length_normalize),
        all choices packed after the context in one forward (glmkit/choices.py). Blank-filling GLMs (original
        GLM, ChatGLM-6B) score each choice as the span of the context's first mask ([gMASK] appended when there
        is none); causal ones (ChatGLM2/3, GLM-4) as the answer to the context sent as a user message."""
        tok, cfg = self.tokenizer, self.config
        if isinstance(choices, str) or not choices:
            raise ValueError("choices must be a non-empty list of strings")
        if cfg.prefix_lm:
            ids = tok.encode_for_generation(context)
            ctx = ids[:-1] if ids and ids[-1] == cfg.sop_token_id else ids
            mask_pos = None
        else:
            ctx = self.chat_format.render([{"role": "user", "content": context}]).ids
            mask_pos = None
        choice_ids = [tok.encode_span(c) for c in choices]
        for c, ci in zip(choices, choice_ids):
            if not ci:
                raise ValueError(f"choice {c!r} encodes to no tokens")
        return self.score_choice_ids(ctx, choice_ids, length_normalize, mask_pos)

    def score_choice_ids(self, context_ids: Sequence[int], choice_ids: Sequence[Sequence[int]],
                         length_normalize: bool = False, mask_pos: Optional[int] = None) -> list[float]:
        """score_choices over token ids: context_ids without <sop> (blank-filling GLMs: [CLS] ... <eos>, the
        mask position its first mask token unless mask_pos says otherwise) or the whole prompt (causal GLMs)."""
        from . import choices as mc
        cfg = self.config
        ctx = [int(i) for i in context_ids]
        if cfg.prefix_lm and mask_pos is None:
            mask_pos = int(self.model.sequence_state(torch.tensor([ctx])).mask_pos[0])
            if mask_pos < 0:
                raise ValueError("the context has no mask token for the choices to fill")
        packed = mc.pack(ctx, choice_ids, cfg.sop_token_id, mask_pos, two_d=cfg.prefix_lm)
        if packed.ids.shape[1] > cfg.max_seq_len:
            raise ContextOverflow(f"the context and all choices take {packed.ids.shape[1]} tokens, more than the "
                                  f"model's {cfg.max_seq_len} positions")
        return mc.score(self.model, packed, length_normalize)


    def _fill_blanks_130b(self, text: str, beams: int = 1, **options) -> Infilled:
        """GLM-130B's generate.py fill_blanks: the generation mask is [MASK] if the text has one, else [sMASK],
        else [gMASK] (appended when the text has none); each occurrence of it, left to right, is generated
        after the text so far + sop (at the mask's position unless [gMASK]) and spliced in. Sampling as
        generate.sh (BaseStrategy: temperature 1, top-p 0.7) unless options say otherwise; beams > 1: beam
        search (length_penalty, no_repeat_ngram_size, min_gen_length)."""
        tok = self.tokenizer
        gen_mask = next((m for m in ("[MASK]", "[sMASK]") if m in text), "[gMASK]")
        use_gmask = gen_mask == "[gMASK]"
        seq = tok.encode(text)[:-1]                           # generate.py's seq, before sop
        mask_id, sop = tok.special[gen_mask], tok.special["sop"]
        pieces = MASK_TEXT.split(text if MASK_TEXT.search(text) else text + gen_mask)
        out, spans, stats = pieces[0], [], []
        k = 1
        while mask_id in seq:
            mpos = seq.index(mask_id)
            ids = seq + [sop]
            state = SeqState(torch.tensor([len(ids) - 1]), torch.tensor([-1 if use_gmask else mpos]))
            if beams > 1:
                best = self.beam_search(ids, beams, state=state, **options)[0]
                span_ids, span = best.tokens, str(best)
            else:
                stream = self.engine.generate(ids, self.sampling_params(**options), self.chat_format.stop_ids, state)
                span_ids = list(stream)
                span = tok.decode(span_ids)
                stats.append(stream.stats)
            seq = seq[:mpos] + span_ids + seq[mpos + 1:]
            spans.append(span)
            while k < len(pieces) and pieces[k] != gen_mask:  # other masks stay as they are
                out += pieces[k] + pieces[k + 1]
                k += 2
            out += span + (pieces[k + 1] if k + 1 < len(pieces) else "")
            k += 2
        while k < len(pieces):
            out += pieces[k] + (pieces[k + 1] if k + 1 < len(pieces) else "")
            k += 2
        return Infilled(out, spans, stats)


def _sync_glm_ids(cfg, tok) -> None:
    """Original GLM: the token ids the model derives positions from are the tokenizer's (its folder's files)."""
    sp = tok.special
    cfg.mask_token_id, cfg.sop_token_id = sp["[MASK]"], sp["<|startofpiece|>"]
    cfg.gmask_token_id, cfg.smask_token_id = sp.get("[gMASK]"), sp.get("[sMASK]")
    cfg.eos_token_id, cfg.pad_token_id = sp["<|endofpiece|>"], sp["<|endoftext|>"]


class BeamText(str):
    """One beam of Pipeline.beam_search: its text, with .tokens, .score (length-penalised) and .ended."""

    def __new__(cls, text: str, tokens, score: float, ended: bool):
        s = super().__new__(cls, text)
        s.tokens, s.score, s.ended = list(tokens), float(score), bool(ended)
        return s


def _generation_defaults(path: Path) -> dict:
    f = path / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return {k: d[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in d}


def load(path=None, dtype=None, device: str = "cpu", *, family: Optional[str] = None,
         ctx: Optional[int] = None, progress: bool = False, quantize=None,
         cache_mb: Optional[float] = None, adapter=None, tp: int = 1) -> Pipeline:
    """Load a model folder (official ChatGLM-6B/2/3, GLM-4 in either layout, or glmkit's own) -> Pipeline.

    dtype: None picks float32 on CPU for models under 1B parameters, else bfloat16 (float16 on CUDA unless the
    checkpoint is bf16); quantized models compute in float32 on CPU. ctx: context positions to allocate
    (default 8192, capped by the model). quantize: "int4" | "int8" | "int4:g64" quantizes while loading
    (a folder written by `glmkit quantize` is quantized already and needs nothing). cache_mb: memory for
    the prefix cache of earlier prompts (default engine.DEFAULT_CACHE_MB; 0 turns it off). adapter: a PEFT LoRA
    folder or an official P-tuning v2 folder made for this base (glmkit finetune writes both kinds).
    tp: tensor-parallel degree, inside a torch.distributed group of that size (torchrun; glmkit/parallel/):
    each rank loads only its slices; rank 0's model broadcasts every call, the other ranks must run
    glmkit.parallel.runtime.follow(pipe.model) (the prefix cache is off: cache_mb 0).
    """
    if path is None:                  # the embedded glm-tiny (glmkit/models), when this install carries it
        from .models import embedded_model_path
        path = embedded_model_path()
        if path is None:
            raise NoModelError(NO_MODEL_HELP)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but this PyTorch build sees no CUDA GPU")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("--device mps was asked for, but MPS is not available here")
    path = Path(path).expanduser()
    if tp > 1:
        model, info = _load_tensor_parallel(path, tp, adapter, dtype=dtype, device=device, family=family,
                                            progress=progress, quantize=quantize)
        cache_mb = 0
    else:
        model, info = load_model(path, dtype=dtype, device=device, family=family, progress=progress,
                                 quantize=quantize)
    ptuning = None
    if adapter is not None:
        from .adapters import load_adapter
        adapter = Path(adapter).expanduser()
        ptuning = load_adapter(model, adapter, info.layout)
    from .quant import prepare_model
    prepare_model(model)              # the fast CPU kernels: quantized layers, fp16 / bf16 ones (no-op elsewhere)
    tok = load_tokenizer(path, model.config.family)
    if model.config.family == "glm":
        _sync_glm_ids(model.config, tok)
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size} embedding rows")
    return Pipeline(model, tok, path, ctx=ctx, defaults=_generation_defaults(path), cache_mb=cache_mb,
                    ptuning=ptuning, adapter=adapter, layout=info.layout)


def _load_tensor_parallel(path: Path, tp: int, adapter, **kw):
    """This rank's shards (glmkit/parallel/load.py); rank 0's model leads the others (parallel/runtime.py)."""
    from .parallel import dist
    from .parallel.load import load_sharded
    from .parallel.runtime import lead
    if adapter is not None:
        raise ValueError("adapters are not supported with tensor parallelism (--tp): merge a LoRA first "
                         "(glmkit merge)")
    if dist.world_size() != tp:
        raise RuntimeError(f"tp={tp} needs a torch.distributed group of {tp} processes (torchrun "
                           f"--nproc_per_node {tp}); this one has {dist.world_size()}")
    model, info = load_sharded(path, dist.rank(), tp, **kw)
    if dist.rank() == 0:
        lead(model)
    return model, info
