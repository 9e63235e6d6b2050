"""ParoQuant targets through `dflash_mlx.load` (paroquant's MLX loader).

paroquant's own checkpoint tools (`paroquant.cli.optimize`, `paroquant.cli.convert`) need
CUDA torch and compile a CUDA extension on import, so the tiny target here is written in
the format paroquant 0.1.16's converter writes: AutoAWQ-packed INT4 (qweight, qzeros,
scales) plus the rotations (theta, pairs, channel_scales) on every decoder linear, and
quant_method "paroquant" in config.json.
"""

import json
import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import write_random_draft
from mlx_lm import load as mlx_lm_load
from test_generate import mlx_lm_greedy, run_dflash
from tiny_models import load_config, make_target

import dflash_mlx
from dflash_mlx.convert import convert

GROUP, KROT = 64, 8
QUANT = {"quant_method": "paroquant", "bits": 4, "group_size": GROUP, "krot": KROT}
PROMPT = [5, 17, 42, 7, 99, 3, 61, 28, 11]
_AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order of the 8 nibbles in an int32


def _awq_pack(values: np.ndarray) -> np.ndarray:
    v = values.reshape(values.shape[0], -1, 8)[:, :, _AWQ_ORDER].astype(np.uint32)
    return (v << (4 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32).view(np.int32)


def _rotate(v: np.ndarray, pairs: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The rows of v turned as paroquant turns activations (pairs counted per group)."""
    v = v.copy()
    offset = np.repeat(np.arange(0, v.shape[-1], GROUP), GROUP // 2)
    for p, t in zip(pairs, theta):
        i, j = p[0::2] + offset, p[1::2] + offset
        a, b = v[:, i], v[:, j]
        v[:, i], v[:, j] = a * np.cos(t) + b * np.sin(t), b * np.cos(t) - a * np.sin(t)
    return v


def _paro_linear(w: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """W (out, in) as paroquant's converter stores it: y = Q(R(W s)) . R(x / s)."""
    out_dims, in_dims = w.shape
    pairs = np.stack(
        [
            np.concatenate([rng.permutation(GROUP) for _ in range(in_dims // GROUP)])
            for _ in range(KROT)
        ]
    ).astype(np.int16)
    theta = rng.uniform(-np.pi, np.pi, (KROT, in_dims // 2)).astype(np.float16)
    s = np.float16(1.0) / rng.uniform(0.5, 2.0, in_dims).astype(np.float16)  # stored 1 / s
    rotated = _rotate(w / s.astype(np.float32), pairs, theta.astype(np.float32))
    groups = rotated.reshape(out_dims, -1, GROUP)
    lo, hi = groups.min(-1), groups.max(-1)
    scales = ((hi - lo) / 15).astype(np.float16)
    zeros = np.clip(np.round(-lo / scales), 0, 15)
    q = np.clip(np.round(groups / scales[..., None]) + zeros[..., None], 0, 15)
    return {
        "qweight": _awq_pack(q.reshape(out_dims, in_dims).astype(np.uint8).T),
        "qzeros": _awq_pack(zeros.astype(np.uint8).T),
        "scales": scales.T.copy(),
        "theta": theta,
        "pairs": pairs,
        "channel_scales": s[None],
    }


def make_paro_target(float_target, path):
    """A copy of a tiny float target with every decoder linear ParoQuant-quantized."""
    shutil.copytree(float_target, path)
    rng = np.random.default_rng(0)
    weights = {}
    for name, value in mx.load(str(path / "model.safetensors")).items():
        if ".layers." in name and name.endswith("_proj.weight"):
            prefix = name.removesuffix("weight")
            for k, v in _paro_linear(np.array(value), rng).items():
                weights[prefix + k] = mx.array(v)
        else:
            weights[name] = value
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": QUANT}))
    return path


def test_without_paroquant_load_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "qwen3", "quantization_config": QUANT})
    )
    before = {k: v for k, v in sys.modules.items() if k.startswith("paroquant")}
    with monkeypatch.context() as m:
        for name in [*before, "paroquant"]:
            m.setitem(sys.modules, name, None)  # None: `import paroquant…` fails
        with pytest.raises(ValueError) as e:
            dflash_mlx.load(str(tmp_path))
    assert str(e.value) == f"{tmp_path} is a ParoQuant checkpoint: pip install 'dflash-mlx[paro]'"
    assert {k: v for k, v in sys.modules.items() if k.startswith("paroquant")} == before


def test_paro_target_is_lossless(tmp_path):
    float_target = make_target(tmp_path / "float", "qwen3")
    target = make_paro_target(float_target, tmp_path / "paro")
    hf = write_random_draft(tmp_path / "draft-hf", load_config(target))
    convert(str(hf), str(tmp_path / "draft"), dtype="float32")

    model, tokenizer = dflash_mlx.load(str(target))
    reference, reference_tokenizer = mlx_lm_load(str(float_target))
    assert tokenizer.eos_token_ids == reference_tokenizer.eos_token_ids
    # Every decoder linear is paroquant's, and its rotations undo each other: it stays
    # near its float original (4-bit error ~0.12; a wrong turn gives errors above 1).
    floats = {n: m for n, m in reference.named_modules() if ".layers." in n and "proj" in n}
    rotated = {
        n: m for n, m in model.named_modules() if type(m).__name__ == "RotateQuantizedLinear"
    }
    assert rotated.keys() == floats.keys() and len(rotated) == 28
    for name, layer in rotated.items():
        x = mx.random.normal((4, floats[name].weight.shape[1]), key=mx.random.key(0))
        y = floats[name](x)
        assert (mx.linalg.norm(layer(x) - y) / mx.linalg.norm(y)).item() < 0.2, name

    draft = dflash_mlx.load_draft(tmp_path / "draft")
    assert run_dflash(model, draft, PROMPT, 64) == mlx_lm_greedy(model, PROMPT, 64)
