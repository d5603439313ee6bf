"""glmkit: run, serve, fine-tune and pretrain GLM-family models (ChatGLM-6B/2/3, GLM-4) on your own hardware."""
__version__ = "0.1.0"

from .pipeline import Pipeline, load  # noqa: E402,F401
from .chat_format import ChatResponse, ToolCall  # noqa: E402,F401
