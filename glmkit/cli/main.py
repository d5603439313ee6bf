"""`glmkit` entry point: a sub-command per module in glmkit/cli/."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "chat": "Chat with a model in the terminal (streaming, multi-turn).",
    "generate": "Continue a raw prompt (no chat format) and print the result.",
    "infill": "Fill the [MASK]/[sMASK]/[gMASK] blanks of a text (GLM, ChatGLM-6B) and print the completed text.",
    "choose": "Rank candidate answers for a blank (GLM's multiple-choice scoring) and print them best first.",
    "quantize": "Write an INT8/INT4 weight-only quantized copy of a model folder.",
    "export-gguf": "Write a model as a GGUF file for llama.cpp (q4_0, q8_0, f16, f32).",
    "merge": "Fold a LoRA adapter into a base model's weights and write the merged model folder.",
    "serve": "Serve a model over HTTP: OpenAI-compatible API, ChatGLM's api.py route, web chat.",
    "plot": "Plot a training run's loss and learning rate (DIR/metrics.jsonl) as a PNG.",
    "train-tokenizer": "Train a ChatGLM-6B-style SentencePiece tokenizer (ice_text.model) on text files.",
    "pretrain": "Pretrain a GLM with autoregressive blank infilling (or fine-tune it on chats with --sft).",
    "finetune": "Fine-tune a model with LoRA (also on an INT4/INT8 base), P-tuning v2 or all its weights.",
    "eval": "Answer the examples of a dataset and score the answers (ROUGE-1/2/L, BLEU-4) as ChatGLM does.",
    "models": "List the local model store ($GLMKIT_MODELS, default ~/.glmkit/models): what --model NAME finds.",
    "kb": "A local knowledge base: add files (txt/md/html/pdf/docx/json), search them, answer from them with "
          "citations.",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmkit",
        description="Run GLM-family models (ChatGLM-6B, ChatGLM2/3-6B, GLM-4-9B) on your own hardware.",
        epilog="examples:\n  glmkit chat --model ~/models/chatglm3-6b\n"
               "  glmkit generate --model ~/models/chatglm3-6b --prompt '床前明月光'\n"
               "Run `glmkit COMMAND --help` for the options of each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__
    p.add_argument("--version", action="version", version=f"glmkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        mod = importlib.import_module(f".{name.replace('-', '_')}", __package__)
        sp = sub.add_parser(name, help=help_text, description=help_text, epilog=mod.EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not getattr(args, "_run", None):
        p.print_help()
        return 2
    try:
        return args._run(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:                                  # noqa: BLE001 (re-raised unless a user error)
        if not isinstance(e, _user_errors()):
            raise
        print(f"glmkit {args.command}: error: {e}", file=sys.stderr)
        return 1


# The errors printed as "glmkit CMD: error: ..." (exit status 1) instead of a traceback: each module's own error
# class, looked up only when something was raised and only in modules already imported (an error of a module that
# was never imported cannot have been raised). So a command that never loads a model (glmkit kb ...) does not
# import glmkit.checkpoint, and with it torch, just to name its error class.
_ERROR_CLASSES = (("glmkit.checkpoint", "CheckpointError"), ("glmkit.tokenizer", "TokenizerError"),
                  ("glmkit.chat_format", "ChatFormatError"))


def _user_errors() -> tuple:
    found = [getattr(sys.modules[m], name, None) for m, name in _ERROR_CLASSES if m in sys.modules]
    return (ValueError, RuntimeError, *(c for c in found if isinstance(c, type)))
