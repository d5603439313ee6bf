"""Answer a question from a knowledge base with a glmkit Pipeline, langchain-ChatGLM style, citing the sources.

ask(kb, question, pipe) retrieves the top-k chunks; when none scores at least the threshold it answers the fixed
refusal ("根据已知信息无法回答该问题。" for a Chinese question, "The knowledge base has no answer to that." for
an English one) without calling the model. Otherwise the question goes to the model inside langchain-ChatGLM's
prompt (PROMPT_ZH; PROMPT_EN for English questions) with the chunks numbered [1], [2]..., as many as fit the
model's context, and the answer is followed by the numbered sources (file, page or lines).
prepare() is ask() without the model's run: the refusal, or the messages to give a model (glmkit serve answers
them on its engine).

History (earlier turns, OpenAI-style messages or (question, answer) pairs) is given to the model as the chat so
far, and a follow-up is retrieved for twice: with the question alone and with the previous question prepended
("它的许可证呢？" after "霞鹜文楷是什么？"); each chunk keeps the better of its two scores.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

from .retrieve import TOP_K

REFUSAL_ZH = "根据已知信息无法回答该问题。"
REFUSAL_EN = "The knowledge base has no answer to that."
PROMPT_ZH = ("已知信息：\n{context}\n\n根据上述已知信息，简洁和专业的来回答用户的问题。"
             "如果无法从中得到答案，请说 \"根据已知信息无法回答该问题\" 或 \"没有提供足够的相关信息\"，"
             "不允许在答案中添加编造成分，答案请使用中文。 问题是：{question}")
PROMPT_EN = ("Known information:\n{context}\n\nBased on the known information above, answer the user's question "
             "concisely and professionally. If the answer cannot be found in it, say \"The known information does "
             "not answer this question\" or \"Not enough relevant information was provided\"; do not add anything "
             "made up. Answer in English. The question is: {question}")
SOURCES_HEADER = {"zh": "来源：", "en": "Sources:"}
PROMPT_MARGIN = 32              # tokens kept free for the chat format's own tokens around the prompt

_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile("[A-Za-z]")


def language(text: str) -> str:
    """"zh" when CJK characters make up at least 30% of the letters (a Chinese question naming Debian or
    GNOME is Chinese; an English one quoting 霞鹜文楷 is English), else "en"."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    return "zh" if cjk and cjk >= 0.3 * (cjk + latin) else "en"


@dataclass
class Answer:
    question: str
    text: str                       # the model's answer (or the refusal), without the list of sources
    found: bool                     # False: nothing in the KB passed the threshold, the model was not asked
    hits: list = field(default_factory=list)     # the chunks given to the model, numbered from 1
    lang: str = "zh"

    @property
    def sources_text(self) -> str:
        if not self.hits:
            return ""
        lines = [f"[{i}] {h.cite()}" for i, h in enumerate(self.hits, 1)]
        return SOURCES_HEADER[self.lang] + "\n" + "\n".join(lines)

    @property
    def full_text(self) -> str:
        """The answer followed by its numbered sources."""
        return self.text + ("\n\n" + self.sources_text if self.hits else "")

    def to_json(self) -> dict:
        return {"answer": self.text, "found": self.found, "sources": [h.to_json() for h in self.hits]}


class AnswerRun:
    """A streamed answer: iterate for text pieces (the model's, then the sources block); .answer once done."""

    def __init__(self, pieces: Iterator[str], answer: Answer, run=None):
        self._pieces, self.answer, self.run = pieces, answer, run

    def __iter__(self):
        yield from self._pieces
        if self.run is not None:
            self.answer.text = str(self.run.response)       # ChatResponse is the answer's str
        if self.answer.hits:
            yield "\n\n" + self.answer.sources_text

    def result(self) -> Answer:
        for _ in self:
            pass
        return self.answer


def _history_messages(history) -> list:
    """OpenAI-style messages, or (question, answer) pairs -> messages."""
    out = []
    for turn in history or []:
        if isinstance(turn, dict):
            out.append({"role": turn["role"], "content": turn.get("content") or ""})
        else:
            q, a = turn
            out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


def retrieve(kb, question: str, history=None, top_k: Optional[int] = None,
             score_threshold: Optional[float] = None) -> list:
    """Hits for a question, and for a follow-up also for the previous question + it (best score per chunk)."""
    hits = kb.search(question, top_k, score_threshold)
    prev = [m["content"] for m in _history_messages(history) if m["role"] == "user"]
    if prev:
        best = {h.chunk_id: h for h in hits}
        for h in kb.search(prev[-1] + "\n" + question, top_k, score_threshold):
            if h.chunk_id not in best or h.score > best[h.chunk_id].score:
                best[h.chunk_id] = h
        hits = sorted(best.values(), key=lambda h: -h.score)[:TOP_K if top_k is None else top_k]
    return hits


def build_prompt(question: str, hits: list, lang: str) -> str:
    context = "\n\n".join(f"[{i}] {h.text}" for i, h in enumerate(hits, 1))
    return (PROMPT_ZH if lang == "zh" else PROMPT_EN).format(context=context, question=question)


def _fit(pipe, question: str, hits: list, lang: str, sampling: dict) -> tuple:
    """The prompt with as many chunks as fit the model's prompt budget (the last one cut short if even one
    does not fit) -> (prompt, the hits it holds)."""
    budget = pipe.prompt_budget(pipe.sampling_params(**sampling)) - PROMPT_MARGIN
    hits = list(hits)
    while True:
        prompt = build_prompt(question, hits, lang)
        n = len(pipe.tokenizer.encode(prompt))
        if n <= budget or not hits:
            return prompt, hits
        if len(hits) > 1:
            hits.pop()
            continue
        h = hits[0]
        keep = int(len(h.text) * budget / n * 0.9)
        if keep < 20:
            return build_prompt(question, [], lang), []
        hits = [type(h)(**{**h.__dict__, "text": h.text[:keep]})]


def prepare(kb, question: str, pipe, history=None, top_k: Optional[int] = None,
            score_threshold: Optional[float] = None, **sampling) -> tuple:
    """Everything of ask() but the model's run -> (Answer, messages): the messages to give the model (the history,
    then the question inside the prompt with the chunks that fit), or None when nothing passed the threshold and
    the Answer is the refusal. Uses pipe's tokenizer and prompt budget only, never its model (so a server can
    run the messages on its own engine). sampling: as Pipeline.sampling_params (max_tokens sets the budget)."""
    lang = language(question)
    hits = retrieve(kb, question, history, top_k, score_threshold)
    if not hits:
        return Answer(question, REFUSAL_ZH if lang == "zh" else REFUSAL_EN, False, [], lang), None
    prompt, used = _fit(pipe, question, hits, lang, sampling)
    return Answer(question, "", True, used, lang), _history_messages(history) + [{"role": "user", "content": prompt}]


def ask(kb, question: str, pipe, history=None, top_k: Optional[int] = None, score_threshold: Optional[float] = None,
        stream: bool = False, **sampling):
    """Answer `question` from `kb` with `pipe` (a glmkit Pipeline) -> Answer, or with stream=True an AnswerRun
    (iterate it for the text as it is generated; .answer afterwards). sampling: Pipeline.chat options
    (temperature, max_tokens/max_new_tokens, seed, ...; the sampling top-k as sample_top_k, since top_k is the
    number of chunks retrieved)."""
    sampling = {("top_k" if k == "sample_top_k" else k): v for k, v in sampling.items() if v is not None}
    ans, messages = prepare(kb, question, pipe, history, top_k, score_threshold, **sampling)
    if messages is None:
        return AnswerRun(iter([ans.text]), ans) if stream else ans
    run = pipe.start_chat(messages, **sampling)
    answer_run = AnswerRun(iter(run), ans, run)
    return answer_run if stream else answer_run.result()
