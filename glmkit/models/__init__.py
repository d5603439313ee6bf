"""Models shipped inside the package: glm-tiny, the default when no model folder is named.

glm-tiny is a 7.3M-parameter GLM (ChatGLM-6B architecture, its own 8k tokenizer) that glmkit pretrained with
blank infilling on classical Chinese poetry and English text and then fine-tuned on a few thousand chats; see
glm-tiny/README.md (its model card) for data, size, losses and what it can and cannot do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

DEFAULT_MODEL = "glm-tiny"


def embedded_model_path(name: str = DEFAULT_MODEL) -> Optional[Path]:
    """The folder of an embedded model, or None when this installation does not carry it."""
    p = Path(__file__).resolve().parent / name
    return p if (p / "config.json").is_file() else None
