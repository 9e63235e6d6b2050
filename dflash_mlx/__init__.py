"""DFlash speculative decoding for MLX."""

__version__ = "0.1.0"

from .checkpoint import CheckpointError
from .config import ConfigError, DraftConfig
from .drafter import DraftModel
from .generate import GenerationResponse, generate, stream_generate
from .loading import load, load_draft
from .session import make_prompt_cache

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DraftConfig",
    "DraftModel",
    "GenerationResponse",
    "generate",
    "load",
    "load_draft",
    "make_prompt_cache",
    "stream_generate",
]
