"""glmkit: run, serve, fine-tune and pretrain GLM-family models (ChatGLM-6B/2/3, GLM-4) on your own hardware."""
__version__ = "0.1.0"

# The public names are imported on first use (PEP 562), so `import glmkit` (and `glmkit --help`) does not
# import torch: glmkit.pipeline does.
_LAZY = {
    "load": "pipeline",
    "Pipeline": "pipeline",
    "ChatResponse": "chat_format",
    "ToolCall": "chat_format",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # `import glmkit; glmkit.pipeline....` worked when the package imported its submodules eagerly
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
