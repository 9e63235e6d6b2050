"""Where the demo pair lives: a tiny trained target and its DFlash draft, shipped as
package data so `dflash-mlx generate` runs offline from a wheel as from a checkout."""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo_pair"
TARGET = DEMO_DIR / "target"  # Qwen3 code model (mlx-lm / HF layout)
DRAFT = DEMO_DIR / "draft"  # its DFlash draft (published HF layout)
EVAL_PROMPTS = DEMO_DIR / "eval_prompts.jsonl"  # held-out prompts, neither model trained on
PROMPT = "    def __repr__(self):\n"  # the demo target writes Python


def is_demo(path: str | Path | None) -> bool:
    """Whether `path` (None: the default) names the demo target or draft."""
    return path is None or Path(path).resolve() in (TARGET, DRAFT)
