"""GGUF DFlash drafts (llama.cpp's `dflash` architecture) read through MLX's GGUF reader.

Tiny drafts written by the reference in the published HF format are also written as
GGUF under llama.cpp's tensor names and metadata keys (`mx.save_gguf` for float files;
a small writer here for Q8_0/Q4_0 blocks, which mx.save_gguf cannot write); the GGUF
must load to the same logits as the same weights from safetensors.
"""

import json
import struct

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference.checkpoints import write_checkpoint
from reference.model import load_reference, read_config, read_state_dict

from dflash_mlx import load_draft
from dflash_mlx.checkpoint import read
from dflash_mlx.convert import main as convert_main
from dflash_mlx.dflash2 import DFlash2DraftModel
from dflash_mlx.gguf import GGUFError, tensor_name

# Our names -> llama.cpp's (gguf-py tensor_mapping for the DFLASH arch).
_TOP = {
    "fc": "fc",
    "hidden_norm": "enc.output_norm",
    "norm": "output_norm",
    "candidate_selector.hidden_projection": "selector_hidden",
    "candidate_selector.predecessor_codebook": "selector_predecessor",
    "candidate_selector.successor_codebook": "selector_successor",
}
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "attention_conv.kernel_projection": "attn_conv_proj",
    "mlp_conv.kernel_projection": "ffn_conv_proj",
    "attention_conv.base_kernel": "attn_conv_base",
    "mlp_conv.base_kernel": "ffn_conv_base",
}


def llama_cpp_name(name: str) -> str:
    for ours, theirs in _TOP.items():
        if name == ours or name.startswith(ours + "."):
            rest = name[len(ours) :]
            return theirs + (rest or ".weight")
    _, i, rest = name.split(".", 2)
    for ours, theirs in _LAYER.items():
        if rest == ours or rest.startswith(ours + "."):
            suffix = rest[len(ours) :]
            return f"blk.{i}.{theirs}{suffix}"
    raise KeyError(name)


def llama_cpp_metadata(raw: dict) -> dict:
    """The metadata llama.cpp's DFlash converter writes for a draft config.json."""
    d = raw["dflash_config"]
    n = raw["num_hidden_layers"]
    u32 = lambda v: mx.array(v, dtype=mx.uint32)
    f32 = lambda v: mx.array(v, dtype=mx.float32)
    meta = {
        "general.architecture": "dflash",
        "dflash.block_count": u32(n),
        "dflash.embedding_length": u32(raw["hidden_size"]),
        "dflash.feed_forward_length": u32(raw["intermediate_size"]),
        "dflash.attention.head_count": u32(raw["num_attention_heads"]),
        "dflash.attention.head_count_kv": u32(raw["num_key_value_heads"]),
        "dflash.attention.key_length": u32(raw["head_dim"]),
        "dflash.attention.value_length": u32(raw["head_dim"]),
        "dflash.attention.layer_norm_rms_epsilon": f32(raw["rms_norm_eps"]),
        "dflash.rope.freq_base": f32(raw.get("rope_theta") or raw["rope_parameters"]["rope_theta"]),
        "dflash.context_length": u32(raw["max_position_embeddings"]),
        "dflash.block_size": u32(d.get("block_size", raw.get("block_size"))),
        "dflash.target_layers": mx.array([i + 1 for i in d["target_layer_ids"]], dtype=mx.int32),
        "dflash.num_target_layers": u32(raw["num_target_layers"]),
        "tokenizer.ggml.mask_token_id": u32(d["mask_token_id"]),
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(raw["vocab_size"])],
        # DFlash 1 converters write this for every draft (z-lab's sliding layers stay causal).
        "dflash.attention.causal": mx.array(bool(raw.get("is_causal", False))),
    }
    kinds = raw.get("layer_types") or ["full_attention"] * n
    if "sliding_attention" in kinds:
        meta["dflash.attention.sliding_window"] = u32(raw["sliding_window"])
        meta["dflash.attention.sliding_window_pattern"] = mx.array(
            [k == "sliding_attention" for k in kinds]
        )
    for key in ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k"):
        if key in d:
            meta[f"dflash.{key}"] = u32(d[key])
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        meta["dflash.rope.scaling.type"] = rope["rope_type"]
        meta["dflash.rope.scaling.factor"] = f32(rope["factor"])
        meta["dflash.rope.scaling.original_context_length"] = u32(
            rope["original_max_position_embeddings"]
        )
    return meta


def write_gguf_float(hf_dir, path, dtype=mx.float32):
    """The checkpoint at hf_dir as an F32/F16 GGUF (mx.save_gguf)."""
    raw = read_config(hf_dir)
    state = read_state_dict(hf_dir)
    arrays = {
        llama_cpp_name(k): mx.array(v.float().numpy()).astype(dtype) for k, v in state.items()
    }
    mx.save_gguf(str(path), arrays, llama_cpp_metadata(raw))
    return path


# ---- a minimal GGUF v3 writer, for block-quantized tensors -------------------------


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, value) -> bytes:
    out = _string(key)
    if isinstance(value, mx.array):
        value = value.tolist()
    if isinstance(value, str):
        return out + struct.pack("<I", 8) + _string(value)
    if isinstance(value, bool):
        return out + struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return out + struct.pack("<II", 4, value)
    if isinstance(value, float):
        return out + struct.pack("<If", 6, value)
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return out + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(map(_string, value))
        if all(isinstance(v, bool) for v in value):
            return (
                out + struct.pack("<IIQ", 9, 7, len(value)) + struct.pack(f"<{len(value)}?", *value)
            )
        return out + struct.pack("<IIQ", 9, 5, len(value)) + struct.pack(f"<{len(value)}i", *value)
    raise TypeError(value)


def q8_0(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """ggml Q8_0: per 32 values an f16 scale d = max|w|/127 and int8 q; w ~ d*q."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    d = (np.abs(blocks).max(-1, keepdims=True) / 127).astype(np.float16)
    df = d.astype(np.float32)
    q = np.round(np.divide(blocks, df, out=np.zeros_like(blocks), where=df != 0)).astype(np.int8)
    data = b"".join(d[i].tobytes() + q[i].tobytes() for i in range(len(q)))
    return data, (df * q).reshape(w.shape)


def q4_0(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """ggml Q4_0: per 32 values an f16 scale d = max/-8 (signed max) and 4-bit
    q + 8 in [0, 15], values 0-15 in the low nibbles, 16-31 in the high ones."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    idx = np.abs(blocks).argmax(-1)
    signed_max = blocks[np.arange(len(blocks)), idx][:, None]
    d = (signed_max / -8).astype(np.float16)
    df = d.astype(np.float32)
    inv = np.divide(1.0, df, out=np.zeros_like(df), where=df != 0)
    q = np.clip(np.floor(blocks * inv + 8.5), 0, 15).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    data = b"".join(d[i].tobytes() + packed[i].tobytes() for i in range(len(q)))
    return data, (df * (q.astype(np.float32) - 8)).reshape(w.shape)


GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8, "Q4_K": 12}


def write_gguf(path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict) -> dict:
    """Write GGUF v3; tensors {name: (type, array)}. Returns {name: the float values the
    file holds} (the quantized ones as a reader dequantizes them)."""
    header, infos, data, values = b"", b"", b"", {}
    for name, (kind, a) in tensors.items():
        if kind == "F32":
            blob, values[name] = a.astype(np.float32).tobytes(), a.astype(np.float32)
        elif kind == "F16":
            blob, values[name] = (
                a.astype(np.float16).tobytes(),
                a.astype(np.float16).astype(np.float32),
            )
        elif kind == "Q8_0":
            blob, values[name] = q8_0(a)
        elif kind == "Q4_0":
            blob, values[name] = q4_0(a)
        elif kind == "Q4_K":  # all-zero super-blocks of 256 values (144 bytes): zeros
            blob, values[name] = bytes(144 * (a.size // 256)), np.zeros(a.shape, np.float32)
        else:
            raise ValueError(kind)
        data += b"\0" * (-len(data) % 32)
        infos += _string(name) + struct.pack("<I", a.ndim)
        infos += struct.pack(f"<{a.ndim}Q", *reversed(a.shape))  # ggml: innermost first
        infos += struct.pack("<IQ", GGML[kind], len(data))
        data += blob
    kvs = b"".join(_kv(k, v) for k, v in metadata.items())
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)) + kvs + infos
    header += b"\0" * (-len(header) % 32)
    path.write_bytes(header + data)
    return values


# ---- tests ------------------------------------------------------------------------

VOCAB_HEAD = 64


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {
        "dflash2": write_checkpoint(root / "dflash2", "dflash2", seed=3, dtype=torch.float32),
        "qwen35": write_checkpoint(
            root / "qwen35",
            "qwen35",
            seed=4,
            dtype=torch.float32,
            vocab_size=512,
            dflash_config={"mask_token_id": 500},
        ),
    }


def logits(draft, seed=0):
    """Logits of a random block + context through a random head; for DFlash 2 also the
    greedy proposal (the selector reads the codebooks)."""
    cfg = draft.config
    rng = np.random.default_rng(seed)
    H = cfg.hidden_size
    W = mx.array((rng.standard_normal((cfg.vocab_size, H)) / H**0.5).astype(np.float32))
    E = mx.array(rng.standard_normal((cfg.vocab_size, H)).astype(np.float32))
    draft.bind_head(lambda ids: E[ids], lambda h: h @ W.T)
    ctx = mx.array(rng.standard_normal((1, 30, cfg.num_taps * H)).astype(np.float32))
    block = mx.array(rng.standard_normal((1, cfg.block_size, H)).astype(np.float32))
    out = np.array(draft.logits(draft(block, ctx)).astype(mx.float32))
    if isinstance(draft, DFlash2DraftModel):
        from dflash_mlx.sampling import SamplingParams

        cache = draft.make_cache()
        draft.add_context(ctx, cache)
        tokens, _ = draft.propose(mx.array([5], dtype=mx.int32), cache, 5, SamplingParams())
        return out, np.array(tokens)
    return out, None


@pytest.mark.parametrize("style", ["dflash2", "qwen35"])
def test_float_gguf_matches_safetensors(tmp_path, checkpoints, style):
    hf = checkpoints[style]
    gguf = write_gguf_float(hf, tmp_path / f"{style}.gguf")
    from_st, from_gguf = load_draft(hf, dtype="float32"), load_draft(gguf)
    assert type(from_gguf) is type(from_st)
    for field in (
        "block_size",
        "mask_token_id",
        "target_layer_ids",
        "num_target_layers",
        "layer_types",
        "sliding_window",
        "is_causal",
        "rope_theta",
        "architecture",
        "conv_kernel_size",
        "conv_group_size",
        "selector_rank",
        "selector_top_k",
        "vocab_size",
        "head_dim",
        "num_key_value_heads",
    ):
        assert getattr(from_gguf.config, field) == getattr(from_st.config, field), field
    a, ta = logits(from_st)
    b, tb = logits(from_gguf)
    assert np.abs(a - b).max() <= 1e-5
    if ta is not None:
        assert ta.tolist() == tb.tolist()


def test_f16_gguf_dir_converts(tmp_path, checkpoints):
    """convert.py --hf-path <dir holding a .gguf>; llama.cpp keeps norms F32 beside F16
    weights: the draft comes out in one float dtype."""
    src = tmp_path / "src"
    src.mkdir()
    raw = read_config(checkpoints["dflash2"])
    state = read_state_dict(checkpoints["dflash2"])
    arrays = {
        llama_cpp_name(k): mx.array(v.numpy()).astype(mx.float32 if "norm" in k else mx.float16)
        for k, v in state.items()
    }
    mx.save_gguf(str(src / "draft-f16.gguf"), arrays, llama_cpp_metadata(raw))
    out = tmp_path / "mlx"
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out)]) == 0
    draft = load_draft(out)
    assert {v.dtype for _, v in _flat(draft)} == {mx.float16}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DFlash2DraftModel"]
    ref = load_reference(checkpoints["dflash2"])  # the reference reads the original
    assert draft.config.target_layer_ids == ref.spec.target_layer_ids


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_quantized_gguf_stays_quantized(tmp_path, checkpoints):
    """Q8_0 and Q4_0 layers load as MLX 8/4-bit (group 32) layers, with the same
    logits as their dequantized values in fp32 safetensors; a quantized codebook is
    dequantized (the model keeps it as a table)."""
    from mlx.nn import QuantizedLinear
    from safetensors.torch import save_file

    hf = checkpoints["dflash2"]
    raw = read_config(hf)
    state = {k: v.float().numpy() for k, v in read_state_dict(hf).items()}
    kinds = {}
    for k, v in state.items():
        if v.ndim == 2 and v.shape[-1] % 32 == 0:
            kinds[k] = "Q4_0" if "mlp." in k else "Q8_0"
        else:
            kinds[k] = "F32"
    values = write_gguf(
        tmp_path / "q.gguf",
        {llama_cpp_name(k): (kinds[k], v) for k, v in state.items()},
        llama_cpp_metadata(raw),
    )
    # The same values as a float checkpoint: the quantized ones dequantized, the F32
    # ones rounded to float16 (the reader casts them to the file's float dtype: the
    # quantized layers' scales are float16).
    deq = tmp_path / "deq"
    deq.mkdir()
    (deq / "config.json").write_text(json.dumps(raw))
    as_read = {
        k: values[llama_cpp_name(k)].astype(np.float16 if kinds[k] == "F32" else np.float32)
        for k in state
    }
    save_file(
        {k: torch.from_numpy(v.astype(np.float32)) for k, v in as_read.items()},
        str(deq / "model.safetensors"),
    )
    q = load_draft(tmp_path / "q.gguf")
    assert (
        isinstance(q.layers[0].mlp.up_proj, QuantizedLinear) and q.layers[0].mlp.up_proj.bits == 4
    )
    assert isinstance(q.layers[1].self_attn.q_proj, QuantizedLinear)
    assert q.layers[1].self_attn.q_proj.bits == 8 and q.layers[1].self_attn.q_proj.group_size == 32
    assert q.config.quantization["group_size"] == 32
    assert q.candidate_selector.predecessor_codebook.dtype in (mx.float16, mx.float32)
    a, ta = logits(load_draft(deq, dtype="float32"))
    b, tb = logits(load_draft(tmp_path / "q.gguf", dtype="float32"))
    err = np.abs(a - b).max()
    assert err <= 1e-4, err
    assert ta.tolist() == tb.tolist()


def test_names_and_errors(tmp_path, checkpoints):
    assert tensor_name("blk.3.attn_output.weight") == "layers.3.self_attn.o_proj.weight"
    assert tensor_name("enc.output_norm.weight") == "hidden_norm.weight"
    assert tensor_name("blk.0.ffn_conv_base") == "layers.0.mlp_conv.base_kernel"
    assert tensor_name("selector_successor.weight") == "candidate_selector.successor_codebook"
    assert tensor_name("blk.1.attn_q.scales") == "layers.1.self_attn.q_proj.scales"
    with pytest.raises(GGUFError, match="token_embd"):
        tensor_name("token_embd.weight")
    raw = read_config(checkpoints["qwen35"])
    meta = llama_cpp_metadata(raw)
    arrays = {"output_norm.weight": mx.ones((raw["hidden_size"],))}
    mx.save_gguf(str(tmp_path / "llama.gguf"), arrays, {**meta, "general.architecture": "llama"})
    with pytest.raises(GGUFError, match="architecture is 'llama'"):
        read(tmp_path / "llama.gguf")
    del meta["dflash.target_layers"]
    mx.save_gguf(str(tmp_path / "x.gguf"), arrays, meta)
    with pytest.raises(GGUFError, match="dflash.target_layers"):
        read(tmp_path / "x.gguf")
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        mx.save_gguf(str(two / n), arrays, meta)
    with pytest.raises(ValueError, match="several GGUF files"):
        read(two)


def test_k_quants_are_dequantized_with_a_note(tmp_path):
    """A type MLX cannot keep quantized (Q4_K) comes back float16, and the warning
    names it; the header reader sees the type."""
    from dflash_mlx.gguf import tensor_types

    path = tmp_path / "k.gguf"
    write_gguf(path, {"fc.weight": ("Q4_K", np.zeros((2, 256), np.float32))}, {"a": "b"})
    assert tensor_types(path) == {"fc.weight": "Q4_K"}
    with pytest.warns(UserWarning, match="1 Q4_K"), pytest.raises(GGUFError, match="architecture"):
        read(path)
    assert mx.load(str(path))["fc.weight"].dtype == mx.float16


def test_hub_gguf_repos(tmp_path, checkpoints, monkeypatch):
    """`owner/name/file.gguf` fetches that file; a Hub repo whose only weights are one
    .gguf fetches it; several need the file named (the Hub is mocked: no network)."""
    import huggingface_hub

    gguf = write_gguf_float(checkpoints["dflash2"], tmp_path / "draft-Q8_0.gguf")
    fetched = []
    files = {"org/one": ["README.md", "draft-Q8_0.gguf"], "org/two": ["a.gguf", "b.gguf"]}
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")  # GGUF repos may carry the HF config

    def hf_hub_download(repo, filename):
        fetched.append((repo, filename))
        return str(gguf)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: files[repo])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot))
    config, _ = read("org/one/draft-Q8_0.gguf")
    assert config.is_dflash2 and fetched == [("org/one", "draft-Q8_0.gguf")]
    read("org/one")
    assert fetched[-1] == ("org/one", "draft-Q8_0.gguf")
    with pytest.raises(ValueError, match="several GGUF files"):
        read("org/two")


def test_target_depth_not_recorded(tmp_path, checkpoints):
    """llama.cpp's metadata has no target layer count: the paper's default taps give it
    back; other taps give the least depth they allow; both are marked inferred (and the
    mark survives conversion)."""
    hf = checkpoints["qwen35"]
    raw = read_config(hf)
    arrays = {
        llama_cpp_name(k): mx.array(v.float().numpy()) for k, v in read_state_dict(hf).items()
    }
    meta = llama_cpp_metadata(raw)
    del meta["dflash.num_target_layers"]
    meta["dflash.target_layers"] = mx.array([3, 11, 20, 29], dtype=mx.int32)  # not the paper's
    mx.save_gguf(str(tmp_path / "a.gguf"), arrays, meta)
    config, _ = read(tmp_path / "a.gguf")
    assert (config.num_target_layers, config.num_target_layers_inferred) == (29, True)
    # [1, 10, 20, 29] are the paper's taps for a 32-layer target
    meta["dflash.target_layers"] = mx.array([2, 11, 21, 30], dtype=mx.int32)
    mx.save_gguf(str(tmp_path / "b.gguf"), arrays, meta)
    config, _ = read(tmp_path / "b.gguf")
    assert (config.num_target_layers, config.num_target_layers_inferred) == (32, True)
    assert (
        convert_main(["--hf-path", str(tmp_path / "b.gguf"), "--mlx-path", str(tmp_path / "m")])
        == 0
    )
    assert load_draft(tmp_path / "m").config.num_target_layers_inferred
    assert not load_draft(hf).config.num_target_layers_inferred
