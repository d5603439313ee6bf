"""glmkit chat: interactive terminal chat with streaming output and history."""
from __future__ import annotations

import sys

from .common import add_model_args, add_sampling_args, load_pipeline, sampling_kwargs, stats_line

EXAMPLES = """examples:
  glmkit chat --model ~/models/chatglm3-6b
  glmkit chat --model ~/models/glm-4-9b-chat --system "Answer in English." -t 0.3 --verbose
  glmkit chat --kb my-kb --model ~/models/chatglm3-6b        # answers from a knowledge base (glmkit kb), cited

in the chat:  /clear  forget the conversation    /exit or Ctrl-D  quit    Ctrl-C  stop the answer"""

HELP = "commands: /clear (forget the conversation), /exit (or Ctrl-D) to quit; Ctrl-C stops an answer"


def add_arguments(p):
    add_model_args(p)
    p.add_argument("--system", "-s", default=None, help="system prompt (ChatGLM-6B/2 prepend it to each question)")
    add_sampling_args(p)
    g = p.add_argument_group("knowledge base")
    g.add_argument("--kb", metavar="KB", default=None,
                   help="answer every turn from this knowledge base (see glmkit kb): retrieved chunks in the "
                        "prompt, numbered sources after each answer, the fixed refusal when nothing matches")
    g.add_argument("--kb-top-k", type=int, default=None, metavar="K", help="chunks per answer (default 5)")
    g.add_argument("--score-threshold", type=float, default=None, metavar="S",
                   help="with --kb: drop chunks scoring below S, 0..1 (default 0.08)")


def _kb_turn(kb, args, pipe, line, history, kw):
    """One --kb turn: the answer streamed through kb.answer.ask -> (the ChatRun or None, the answer text)."""
    from ..kb.answer import ask

    kw = {("sample_top_k" if k == "top_k" else k): v for k, v in kw.items()}     # top_k: retrieval's
    run_ = ask(kb, line, pipe, history=history, top_k=args.kb_top_k, score_threshold=args.score_threshold,
               stream=True, **kw)
    for piece in run_:
        sys.stdout.write(piece)
        sys.stdout.flush()
    return run_.run, run_.answer.text


def run(args) -> int:
    from ..chat_format import ChatFormatError
    from ..config import FAMILY_NAMES
    from ..engine import ContextOverflow

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    kb = None
    if args.kb:                                   # before the model: a wrong KB path fails at once
        from ..kb import KnowledgeBase
        kb = KnowledgeBase.open(args.kb, create=False)
    pipe = load_pipeline(args)
    name = FAMILY_NAMES[pipe.config.family]
    print(f"glmkit chat - {name} from {pipe.path} ({pipe.model.dtype}, {pipe.device}, "
          f"context {pipe.ctx})\n{HELP}", flush=True)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if kb is not None:
        print(f"knowledge base {args.kb}: {len(kb.files())} files, retrieval {kb.mode_note}", flush=True)
    history: list[dict] = []
    kw = sampling_kwargs(args)
    while True:
        try:
            line = input("\nuser> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/clear":
            history = []
            print("(conversation cleared)")
            continue
        if cmd in ("/help", "/?"):
            print(HELP)
            continue
        messages = system + history + [{"role": "user", "content": line}]
        if kb is not None:
            print(f"{name}> ", end="", flush=True)
            try:
                run_, text = _kb_turn(kb, args, pipe, line, system + history, kw)
            except (ChatFormatError, ContextOverflow) as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            except KeyboardInterrupt:
                print(" [stopped]", flush=True)
                continue
            print(flush=True)
            history += [messages[-1], {"role": "assistant", "content": text}]
            if args.verbose and run_ is not None:
                print(stats_line(run_.stats, run_.prompt.dropped), file=sys.stderr, flush=True)
            continue
        try:
            run_ = pipe.start_chat(messages, **kw)
        except (ChatFormatError, ContextOverflow) as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        print(f"{name}> ", end="", flush=True)
        try:
            for piece in run_:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            run_._it.close()
            sys.stdout.write(" [stopped]")
        print(flush=True)
        resp = run_.response
        for call in resp.tool_calls:
            print(f"[tool call] {call.name}({call.arguments})")
        history += [messages[-1], resp.to_message()]
        if args.verbose:
            print(stats_line(run_.stats, run_.prompt.dropped), file=sys.stderr, flush=True)
