import json
import os
import sys
from pathlib import Path

# MLX's CUDA backend rounds fp32 matmuls to TF32 unless told not to (read once, at the
# first matmul): the fp32 bounds here are for fp32 maths, as torch does by default.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def pytest_collection_modifyitems(config, items):
    """CUDA-only tests run on the GPU machine; elsewhere they are deselected, not skipped."""
    if mx.cuda.is_available():
        return
    keep = [i for i in items if "cuda" not in i.keywords]
    dropped = [i for i in items if "cuda" in i.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def write_random_draft(
    path: Path,
    target_config: dict,
    *,
    block_size: int = 8,
    seed: int = 0,
    layer_ids=None,
    num_layers: int = 2,
    **overrides,
) -> Path:
    """A random draft in the published HF format (bf16 safetensors) matching a target;
    `overrides` update its config (e.g. head_dim)."""
    from mlx.utils import tree_flatten

    from dflash_mlx.config import DraftConfig
    from dflash_mlx.drafter import DraftModel

    n = target_config["num_hidden_layers"]
    raw = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "block_size": block_size,
        "dflash_config": {
            "mask_token_id": target_config["vocab_size"] - 1,
            "target_layer_ids": layer_ids or [1, n - 2],
        },
        "num_target_layers": n,
        "hidden_size": target_config["hidden_size"],
        "intermediate_size": 2 * target_config["hidden_size"],
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": target_config["vocab_size"],
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        **overrides,
    }
    mx.random.seed(seed)
    model = DraftModel(DraftConfig.from_dict(raw))
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(path / "model.safetensors"),
        {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())},
    )
    (path / "config.json").write_text(json.dumps(raw))
    return path


@pytest.fixture(autouse=True)
def static_caches_on_the_cpu(monkeypatch):
    """Dense targets take the static-cache loop (what a CUDA user runs) in every test;
    tests of the general loop (what Metal and CPU users run) switch it off."""
    from dflash_mlx import session

    monkeypatch.setitem(session.STATIC_MAX_POSITIONS, "cpu", 1 << 30)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def gpu_like_block_costs(monkeypatch):
    """--block-size auto everywhere in the tests, on GPU-like costs (a verify of w tokens
    barely dearer than one step), so auto really drafts, drops to plain steps when the
    random drafts fail, and probes back: every lossless test then mixes widths. On this
    CPU's own measured costs auto would decode plainly throughout (test_block_policy
    checks that case)."""
    from dflash_mlx import block_policy

    costs = {w: 1e-3 * (1.0 if w == 1 else 1.2 + 0.02 * w) for w in range(1, 65)}
    monkeypatch.setattr(
        block_policy, "cached_costs", lambda model, draft, B: block_policy.Costs(dict(costs))
    )


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Fused verify projections on the CPU too (fuse.py); yields (group, input shape) of
    the fused products as they are made."""
    from dflash_mlx import fuse

    monkeypatch.setattr(fuse, "BACKENDS", {"cpu"})
    products = []
    product = fuse.FusedGroup.product
    monkeypatch.setattr(
        fuse.FusedGroup,
        "product",
        lambda self, x: products.append((self, x.shape)) or product(self, x),
    )
    return products
