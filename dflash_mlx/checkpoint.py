"""Read and validate DFlash draft checkpoints: published PyTorch ones and our MLX ones."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from .config import DraftConfig, load_config
from .dflash2 import DFlash2DraftModel
from .drafter import DraftModel
from .gguf import read_gguf

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
_FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


class CheckpointError(ValueError):
    """A draft checkpoint's tensors are unreadable or do not match its config."""


def resolve(path_or_repo: str | Path) -> Path:
    """A local directory as is; anything else is a Hugging Face Hub id."""
    path = Path(path_or_repo)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a directory")
        return path
    if str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1:
        raise CheckpointError(f"{path_or_repo}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(path_or_repo),
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pt", "*.pth"],
            )
        )
    except Exception as e:  # the hub raises many kinds; the user needs the reason
        raise CheckpointError(f"could not fetch '{path_or_repo}' from the Hub: {e}") from e


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists missing shards: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        files = sorted(p for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext))
    if not files:
        raise CheckpointError(f"no weights (*.safetensors, *.bin, *.pt, *.gguf) in {path}")
    return files


def _read_torch(file: Path) -> dict[str, mx.array]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{file.name} is a PyTorch state dict: reading it needs torch "
            "(pip install torch), or convert the checkpoint to safetensors"
        ) from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    out = {}
    for k, t in state.items():
        if not torch.is_floating_point(t):
            raise CheckpointError(f"tensor '{k}' in {file.name} has dtype {t.dtype}")
        dtype = {torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}.get(t.dtype)
        out[k] = mx.array(t.float().numpy()).astype(dtype or mx.float32)
    return out


def read_weights(path: Path) -> dict[str, mx.array]:
    weights = {}
    for file in _weight_files(path):
        if file.suffix == ".safetensors":
            try:
                weights.update(mx.load(str(file)))
            except Exception as e:
                raise CheckpointError(f"cannot read {file}: {e}") from e
        else:
            weights.update(_read_torch(file))
    return weights


# transformers' own save_pretrained of a DFlash2DraftModel built outside from_pretrained
# writes the codebooks as Embedding weights; z-lab's checkpoints store them bare.
_CODEBOOKS = ("candidate_selector.predecessor_codebook", "candidate_selector.successor_codebook")


def normalise_names(config: DraftConfig, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint names as the model names its parameters (the codebooks as stored)."""
    if not config.is_dflash2:
        return weights
    for name in _CODEBOOKS:
        if f"{name}.weight" in weights and name not in weights:
            weights[name] = weights.pop(f"{name}.weight")
    return weights


def validate(model: DraftModel | DFlash2DraftModel, weights: dict[str, mx.array]) -> None:
    """Every key present, none extra, every shape and dtype as the config implies."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    shapes = [
        f"{k}: {tuple(weights[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    dtypes = [
        f"{k}: {v.dtype}"
        for k, v in weights.items()
        if k in expected and expected[k].dtype in _FLOAT_DTYPES and v.dtype not in _FLOAT_DTYPES
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    if shapes:
        problems.append(f"shape mismatches {shapes}")
    if dtypes:
        problems.append(f"unsupported dtypes {dtypes}")
    if problems:
        raise CheckpointError("draft checkpoint does not match its config: " + "; ".join(problems))


def _quantize(model: nn.Module, group_size: int, bits: int, weights: dict | None = None):
    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        if weights is not None:  # loading: follow what was saved
            if f"{path}.scales" not in weights:
                return False
            # mlx_lm's per-layer overrides (GGUF files mix Q4_0 and Q8_0 layers)
            override = (config_q or {}).get(path)
            return dict(override) if isinstance(override, dict) else True
        return module.weight.shape[-1] % group_size == 0

    config_q = model.config.quantization if weights is not None else None

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)


def build(
    config: DraftConfig,
    weights: dict[str, mx.array],
    dtype: mx.Dtype | None = None,
    quantize: tuple[int, int] | None = None,
) -> DraftModel | DFlash2DraftModel:
    """A validated draft from config + weights; cast to `dtype`; quantize=(group, bits)."""
    model = DFlash2DraftModel(config) if config.is_dflash2 else DraftModel(config)
    weights = normalise_names(config, weights)
    if config.quantization:
        q = config.quantization
        _quantize(model, q["group_size"], q["bits"], weights)
    validate(model, weights)
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if v.dtype in _FLOAT_DTYPES else v for k, v in weights.items()
        }
    model.load_weights(list(weights.items()))
    if quantize is not None:
        if config.quantization:
            raise CheckpointError("checkpoint is already quantized")
        group_size, bits = quantize
        _quantize(model, group_size, bits)
        config.quantization = {"group_size": group_size, "bits": bits}
    mx.eval(model.parameters())
    model.eval()
    return model


def _hub_gguf(repo: str, filename: str | None = None) -> Path | None:
    """A GGUF draft from the Hub: `filename` in `repo`, or the repo's only .gguf file
    (None when it has none). GGUF repos hold one file per quantization, so only the
    chosen one is fetched."""
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        if filename is None:
            files = sorted(f for f in list_repo_files(repo) if f.endswith(".gguf"))
            if not files:
                return None
            if len(files) > 1:
                raise CheckpointError(
                    f"'{repo}' holds several GGUF files {files}: give one as {repo}/<file>.gguf"
                )
            filename = files[0]
        return Path(hf_hub_download(repo, filename))
    except CheckpointError:
        raise
    except Exception as e:  # the hub raises many kinds; the user needs the reason
        raise CheckpointError(f"could not fetch '{repo}/{filename}' from the Hub: {e}") from e


def read(path_or_repo: str | Path) -> tuple[DraftConfig, dict[str, mx.array]]:
    """Config and weights of an HF checkpoint dir, a converted dir, a Hub id, or a
    llama.cpp GGUF draft: a .gguf file, a directory (or Hub repo) whose only weights are
    one .gguf file, or `owner/name/file.gguf` on the Hub."""
    path, text = Path(path_or_repo), str(path_or_repo)
    if path.is_file() and path.suffix == ".gguf":
        return read_gguf(path)
    hub_file = text.endswith(".gguf") and text.count("/") == 2
    if hub_file and not path.exists() and not text.startswith((".", "/", "~")):
        repo, filename = text.rsplit("/", 1)
        return read_gguf(_hub_gguf(repo, filename))
    path = resolve(path_or_repo)
    patterns = ("*.safetensors", "*.bin", "*.pt", "*.pth")
    if not any(next(path.glob(p), None) for p in patterns):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) > 1:
            raise CheckpointError(
                f"{path} holds several GGUF files {[f.name for f in ggufs]}: give the file"
            )
        if ggufs:
            return read_gguf(ggufs[0])
        if not Path(path_or_repo).exists() and (file := _hub_gguf(text)) is not None:
            return read_gguf(file)
    return load_config(path), read_weights(path)
