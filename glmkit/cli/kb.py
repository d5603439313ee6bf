"""glmkit kb: a local knowledge base (a directory) — add/remove files, list, search, and answer with citations."""
from __future__ import annotations

import json
import sys

from .common import add_model_args

EXAMPLES = """examples:
  glmkit kb add my-kb docs/ notes.md manual.pdf       # create my-kb/ (kb.sqlite) and add files, folders recursively
  glmkit kb add my-kb docs/                           # again: unchanged files skipped, changed ones replaced
  glmkit kb add my-kb docs/ --chunk-size 300 --chunk-overlap 40
  glmkit kb add my-kb docs/ --embedding-model ~/models/bge-small-zh-v1.5   # + dense vectors (sentence-transformers)
  glmkit kb list my-kb
  glmkit kb search my-kb "如何配置输入法？" --top-k 5
  glmkit kb search my-kb "sort in descending order" --json
  glmkit kb ask my-kb "如何配置输入法？" --model ~/models/chatglm3-6b
  glmkit kb ask my-kb "What does the testing distribution contain?" --json
  glmkit kb remove my-kb docs/old.md
  glmkit kb add team-kb docs/ --store postgresql://kb@db.example:5432/kb    # PostgreSQL + pgvector
  glmkit chat --kb my-kb --model ~/models/chatglm3-6b

Files: .txt .md .html .pdf .docx .jsonl .json. Scores are 0..1 in every retrieval mode (0.4: an average chunk
holding each word of the question once); hits below --score-threshold (default 0.08) are dropped, and when none
is left `kb ask` answers "根据已知信息无法回答该问题。" / "The knowledge base has no answer to that." without
running the model."""


def add_arguments(p):
    sub = p.add_subparsers(dest="kb_command", metavar="SUBCOMMAND", required=True)

    def command(name, help_text, func):
        import argparse
        examples = "examples:\n" + "\n".join(line for line in EXAMPLES.splitlines()
                                              if line.startswith(f"  glmkit kb {name} "))
        sp = sub.add_parser(name, help=help_text, description=help_text, epilog=examples,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("kb", metavar="KB", help="the knowledge base: a directory (created by the first add)")
        sp.add_argument("--store", metavar="URI", default=None,
                        help="keep the KB in PostgreSQL + pgvector (postgresql://user@host:port/db[?schema=NAME]; "
                             "schema by default kb_ + the directory's name) instead of KB/kb.sqlite; kept in "
                             "KB/store.txt, so later commands on KB use it without --store")
        sp.set_defaults(_kb_run=func)
        return sp

    sp = command("add", "Add files and folders (recursively); unchanged files are skipped, changed ones replaced.",
                 run_add)
    sp.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    sp.add_argument("--embedding-model", metavar="DIR", default=None,
                    help="a local sentence-transformers folder (bge-small-zh, bge-m3, m3e, text2vec...) for dense "
                         "retrieval, loaded offline and kept for later adds and searches; '' turns it off")
    sp.add_argument("--chunk-size", type=int, default=None, metavar="N",
                    help="characters per chunk (default: the KB's setting, first 400); kept for later adds")
    sp.add_argument("--chunk-overlap", type=int, default=None, metavar="N",
                    help="characters of whole sentences repeated between chunks (default: the KB's, first 50)")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    sp = command("remove", "Remove files (as added, or any path to them; a folder removes what is under it).",
                 run_remove)
    sp.add_argument("files", nargs="+", metavar="FILE")

    sp = command("list", "List the files of a knowledge base and its settings.", run_list)
    sp.add_argument("--json", action="store_true", help="print a JSON object")

    sp = command("search", "Print the chunks that best match a query, best first.", run_search)
    sp.add_argument("query", metavar="QUERY")
    _add_retrieval_args(sp)
    sp.add_argument("--json", action="store_true",
                    help='print a JSON list of hits: {"source", "location", "heading", "text", "score"}')

    sp = command("ask", "Answer a question from the knowledge base with a model, citing the sources.", run_ask)
    sp.add_argument("question", metavar="QUESTION")
    _add_retrieval_args(sp)
    sp.add_argument("--json", action="store_true", help='print {"answer", "found", "sources": [hits]}')
    add_model_args(sp)
    g = sp.add_argument_group("generation (defaults: the model's official chat() settings)")
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy")
    g.add_argument("--max-new-tokens", "-n", type=int, default=None, metavar="N")
    g.add_argument("--seed", type=int, default=None)


def _add_retrieval_args(sp):
    sp.add_argument("--top-k", "-k", type=int, default=None, metavar="K", help="at most K chunks (default 5)")
    sp.add_argument("--score-threshold", "-s", type=float, default=None, metavar="S",
                    help="drop chunks scoring below S, 0..1 (default 0.08; 0 keeps every chunk sharing a word)")


def run(args) -> int:
    return args._kb_run(args)


def _open(args, create=False, **kw):
    from ..kb import KnowledgeBase
    return KnowledgeBase.open(args.kb, create=create, store=args.store, **kw)


def _err(args, msg: str):
    print(f"glmkit kb {args.kb_command}: {msg}", file=sys.stderr)


def run_add(args) -> int:
    with _open(args, create=True, embedding_model=args.embedding_model) as kb:
        print(f"glmkit kb: retrieval {kb.mode_note}", file=sys.stderr)
        report = kb.add(args.paths, args.chunk_size, args.chunk_overlap, progress=not args.quiet and
                        sys.stderr.isatty())
        for path, reason in report.skipped:
            _err(args, f"skipped {path}: {reason}")
        for path, what in report.warnings:
            _err(args, f"{path}: {what}")
        kb.build_index()                      # now, so that the first search does not wait for it
        print(report.summary())
    done = report.added + report.replaced + report.unchanged + report.removed
    return 1 if report.skipped and not done else 0


def run_remove(args) -> int:
    with _open(args) as kb:
        removed = kb.remove(args.files)
        for s in removed:
            print(f"removed {s}")
        if not removed:
            _err(args, f"not in the knowledge base: {' '.join(args.files)}")
            return 1
        kb.build_index()
    return 0


def run_list(args) -> int:
    import time

    with _open(args) as kb:
        files, settings = kb.files(), kb.settings
        if args.json:
            print(json.dumps({"settings": settings, "store": kb.store.describe(), "files": [
                {"source": f.source, "path": f.path, "chunks": f.chunks, "bytes": f.size, "chars": f.chars,
                 "sha256": f.sha256, "added": f.added} for f in files]}, ensure_ascii=False, indent=1))
            return 0
        for f in files:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(f.added))
            print(f"{f.chunks:6d} chunks  {f.size / 1024:9.1f} KB  {when}  {f.source}")
        print(f"{len(files)} files, {sum(f.chunks for f in files)} chunks; chunk size {settings['chunk_size']}, "
              f"overlap {settings['chunk_overlap']}; {kb.mode_note}; store: {kb.store.describe()}")
    return 0


def run_search(args) -> int:
    with _open(args) as kb:
        hits = kb.search(args.query, args.top_k, args.score_threshold)
        if args.json:
            print(json.dumps([h.to_json() for h in hits], ensure_ascii=False, indent=1))
            return 0
        if not hits:
            _err(args, "no chunk passes the score threshold")
        for i, h in enumerate(hits, 1):
            head = f" — {h.heading}" if h.heading else ""
            print(f"[{i}] {h.score:.3f}  {h.cite()}{head}")
            text = h.text if len(h.text) <= 400 else h.text[:400] + "…"
            print("    " + text.replace("\n", "\n    ") + "\n")
    return 0


def run_ask(args) -> int:
    from ..kb.answer import REFUSAL_EN, REFUSAL_ZH, Answer, ask, language, retrieve

    with _open(args) as kb:
        # nothing found -> the refusal, without loading a model at all
        if not retrieve(kb, args.question, None, args.top_k, args.score_threshold):
            lang = language(args.question)
            ans = Answer(args.question, REFUSAL_ZH if lang == "zh" else REFUSAL_EN, False, [], lang)
            print(json.dumps(ans.to_json(), ensure_ascii=False) if args.json else ans.text)
            return 0
        from .common import load_pipeline

        pipe = load_pipeline(args)
        kw = {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
        run = ask(kb, args.question, pipe, top_k=args.top_k, score_threshold=args.score_threshold, stream=True,
                  **kw)
        if args.json:
            print(json.dumps(run.result().to_json(), ensure_ascii=False, indent=1))
            return 0
        for piece in run:
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
    return 0
