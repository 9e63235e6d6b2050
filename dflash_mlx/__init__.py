"""DFlash speculative decoding for MLX."""

import warnings

__version__ = "0.1.0"

# `python -m dflash_mlx.generate` runs a module this package has imported already; runpy's
# warning about that says nothing a user can act on.
warnings.filterwarnings(
    "ignore", message=r"'dflash_mlx\.\w+' found in sys\.modules", category=RuntimeWarning
)

try:  # importing MLX and mlx-lm takes seconds: Ctrl-C then quits quietly (exit 130)
    from .checkpoint import CheckpointError
    from .config import ConfigError, DraftConfig
    from .drafter import DraftModel
    from .generate import GenerationResponse, generate, stream_generate
    from .loading import load, load_draft
    from .session import make_prompt_cache
except KeyboardInterrupt:
    raise SystemExit(130) from None

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
