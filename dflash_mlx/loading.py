"""Load targets (through mlx_lm) and drafts (converted, unconverted, or from the Hub)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn

from . import paro
from .checkpoint import DTYPES, CheckpointError, build, read
from .config import DraftConfig
from .drafter import DraftModel


def _is_local(path_or_hf_repo: str) -> bool:
    """A path that exists, or one that cannot be a Hub id ('org/name'): the same rule as
    the draft side, so both sides say 'no such directory' for a mistyped path."""
    text = str(path_or_hf_repo)
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") != 1


def _check_target_dir(text: str) -> None:
    """What mlx_lm would report as a traceback or an errno, as one line naming the file."""
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"{text}: no such directory")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (give the model's directory)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json: not an mlx-lm model directory")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} does not hold a JSON object")  # noqa: TRY004 (bad input)
    if "DFlashDraftModel" in (config.get("architectures") or []) or "dflash_config" in config:
        raise ValueError(
            f"{path} is a DFlash draft, not a target model (give it as the draft: --draft-model)"
        )


def load(path_or_hf_repo: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    """Load a target exactly as `mlx_lm.load` does (same arguments), a ParoQuant one through
    paroquant's MLX loader; bad local directories, unreadable weights and failed Hub
    fetches raise one-line ValueErrors."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.utils import _download

    local = _is_local(path_or_hf_repo)
    if local:
        _check_target_dir(str(path_or_hf_repo))
    path = str(Path(path_or_hf_repo).expanduser())
    try:
        if paro.is_paro(_download(path, kwargs.get("revision"), ["config.json"])):
            return paro.load(path, **kwargs)
        return mlx_lm_load(path, **kwargs)
    except RuntimeError as e:  # mlx's safetensors reader: truncated or corrupt file
        raise ValueError(f"cannot read the weights of {path_or_hf_repo}: {e}") from None
    except TypeError as e:  # a config.json the model's ModelArgs cannot take
        raise ValueError(
            f"{path_or_hf_repo}: config.json does not fit its model type: {e}"
        ) from None
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        if local:
            raise
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"could not fetch '{path_or_hf_repo}' from the Hub: {reason}") from None


def load_draft(path_or_hf_repo: str | Path, dtype: str | mx.Dtype | None = None) -> DraftModel:
    """A DFlash draft from a `dflash-mlx convert` output, an unconverted HF checkpoint, or a Hub id.

    Unconverted checkpoints are validated and converted in memory. Bind it to its target
    with `draft.bind(model)` (generation does this for you).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype '{dtype}' (choose from {sorted(DTYPES)})")
        dtype = DTYPES[dtype]
    config, weights = read(path_or_hf_repo)
    _check_draft_shape(path_or_hf_repo, config, weights)
    draft = build(config, weights, dtype=dtype)
    draft.acceptance_prior = _trained_acceptance(Path(path_or_hf_repo))
    return draft


def _trained_acceptance(path: Path) -> dict[int, list[float]] | None:
    """{context length: P(first k drafts accepted), k = 1 …} from the held-out evaluations
    `dflash-mlx train` records beside its checkpoint (short prompts, and long texts cut to
    several lengths): `--block-size auto` starts from the one nearest its sequence."""
    try:
        result = json.loads((path / "train_result.json").read_text())
        runs = [result["eval"], *(result.get("eval_long") or {}).values()]
        priors = {}
        for run in runs:
            values = [float(x) for x in run["per_position_acceptance"]]
            lengths = run.get("prompt_tokens") or {}
            context = run.get("context") or math.sqrt(
                lengths.get("min", 64) * lengths.get("max", 64)
            )
            if values and all(0.0 <= x <= 1.0 for x in values):
                priors[max(1, round(context))] = values
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return priors or None


def _check_draft_shape(path: str | Path, config: DraftConfig, weights: dict) -> None:
    """Weights of another draft than config.json describes: say so in one line rather
    than list every tensor that differs."""
    n_layers = 1 + max(
        (int(k.split(".")[1]) for k in weights if k.startswith("layers.")), default=-1
    )
    found = {"layers": n_layers}
    if "norm.weight" in weights:
        found["hidden size"] = weights["norm.weight"].shape[0]
        if "fc.weight" in weights and "fc.scales" not in weights:
            found["target taps"] = weights["fc.weight"].shape[1] // found["hidden size"]
    expected = {
        "layers": config.num_hidden_layers,
        "hidden size": config.hidden_size,
        "target taps": len(config.target_layer_ids),
    }
    if any(found[k] != expected[k] for k in found):
        raise CheckpointError(
            f"{path}: the weights are a draft of "
            + ", ".join(f"{k} {v}" for k, v in found.items())
            + "; config.json says "
            + ", ".join(f"{k} {expected[k]}" for k in found)
        )
