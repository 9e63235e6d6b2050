"""Config parsing and converter: every variant loads; every bad input is a clear error that
leaves no output behind."""

import contextlib
import io
import json
import os
import stat
import subprocess
import sys

import mlx.core as mx
import pytest
from conftest import ROOT, write_random_draft

from dflash_mlx import load_draft
from dflash_mlx.config import ConfigError, DraftConfig, build_target_layer_ids

TARGET = {"num_hidden_layers": 6, "hidden_size": 64, "vocab_size": 256}


def base_config(**changes):
    raw = {
        "architectures": ["DFlashDraftModel"],
        "block_size": 16,
        "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
        "num_target_layers": 36,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 5,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "rope_theta": 1000000,
    }
    raw.update(changes)
    return raw


def test_paper_default_layer_ids():
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    raw = base_config()
    del raw["dflash_config"]["target_layer_ids"]
    assert DraftConfig.from_dict(raw).target_layer_ids == [1, 9, 17, 25, 33]


def test_config_variants():
    nested = base_config(dflash_config={"mask_token_id": 248070, "block_size": 16})
    del nested["block_size"]
    del nested["rope_theta"]
    nested["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 1e7,
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    nested["layer_types"] = ["sliding_attention"] * 4 + ["full_attention"]
    nested["sliding_window"] = 2048
    cfg = DraftConfig.from_dict(nested)
    assert cfg.block_size == 16 and cfg.rope_theta == 1e7
    assert cfg.rope_scaling["type"] == "yarn" and cfg.sliding_window == 2048
    llama = base_config(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    )
    assert DraftConfig.from_dict(llama).rope_scaling["type"] == "llama3"
    # Round trip through the HF layout.
    assert DraftConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block_size": None}, "block_size"),
        ({"dflash_config": {"target_layer_ids": [1]}}, "mask_token_id"),
        ({"hidden_size": None}, "hidden_size"),
        ({"dflash_config": {"block_size": 8, "mask_token_id": 1}}, "contradicts"),
        ({"dflash_config": {"mask_token_id": 1, "target_layer_ids": [40]}}, "out of range"),
        ({"layer_types": ["sliding_attention"] * 5}, "sliding_window"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
        ({"rope_theta": None}, "rope_theta"),
        ({"rope_scaling": {"rope_type": "yarn"}}, "factor"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}},
            "partial rotary",
        ),
        ({"architectures": ["LlamaForCausalLM"]}, "not a DFlash"),
    ],
)
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        DraftConfig.from_dict(base_config(**change))


def convert_cli(*args):
    """`dflash-mlx convert ARGS`, in this process (a subprocess costs seconds of imports;
    test_help_names_the_command runs the real `python convert.py`)."""
    from dflash_mlx.convert import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    assert "Traceback" not in err.getvalue()
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_convert_writes_what_load_draft_reads(tmp_path):
    hf = write_random_draft(tmp_path / "hf", TARGET)
    result = convert_cli("--hf-path", hf, "--mlx-path", tmp_path / "out", "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "float16" in result.stdout
    draft = load_draft(tmp_path / "out")
    assert draft.fc.weight.dtype == mx.float16
    reference = load_draft(hf, dtype="float16")  # unconverted HF dir, converted in memory
    assert mx.array_equal(draft.fc.weight, reference.fc.weight)
    # Quantized output loads too.
    result = convert_cli(
        "--hf-path",
        hf,
        "--mlx-path",
        tmp_path / "q4",
        "-q",
        "--q-bits",
        "4",
        "--q-group-size",
        "32",
    )
    assert result.returncode == 0, result.stderr
    assert "4-bit" in result.stdout
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
    assert load_draft(tmp_path / "q4").layers[0].self_attn.q_proj.bits == 4


def test_sharded_and_torch_bin_checkpoints(tmp_path):
    torch = pytest.importorskip("torch")
    hf = write_random_draft(tmp_path / "hf", TARGET)
    weights = mx.load(str(hf / "model.safetensors"))
    keys = sorted(weights)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((hf / "config.json").read_text())
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, ks in halves.items():
        mx.save_safetensors(str(sharded / name), {k: weights[k] for k in ks})
    index = {"weight_map": {k: name for name, ks in halves.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((hf / "config.json").read_text())
    torch.save(
        {
            k: torch.tensor(v.astype(mx.float32).tolist()).to(torch.bfloat16)
            for k, v in weights.items()
        },
        binary / "pytorch_model.bin",
    )
    expected = load_draft(hf).fc.weight
    for src in (sharded, binary):
        assert (
            convert_cli("--hf-path", src, "--mlx-path", tmp_path / f"{src.name}-out").returncode
            == 0
        )
        assert mx.array_equal(load_draft(tmp_path / f"{src.name}-out").fc.weight, expected)


def corrupt(hf, tmp_path, kind):
    weights = mx.load(str(hf / "model.safetensors"))
    if kind == "missing config":
        (hf / "config.json").unlink()
        return "config.json"
    if kind == "missing tensor":
        weights.pop("layers.0.mlp.up_proj.weight")
        message = "missing tensors ['layers.0.mlp.up_proj.weight']"
    elif kind == "extra tensor":
        weights["lm_head.weight"] = mx.zeros((4, 4))
        message = "unexpected tensors ['lm_head.weight']"
    elif kind == "misshaped tensor":
        weights["fc.weight"] = mx.zeros((64, 64))
        message = "fc.weight: (64, 64) != (64, 128)"
    elif kind == "unsupported dtype":
        weights["norm.weight"] = weights["norm.weight"].astype(mx.int32)
        message = "unsupported dtypes ['norm.weight: mlx.core.int32']"
    elif kind == "unreadable file":
        (hf / "model.safetensors").write_bytes(b"not a safetensors file")
        return "cannot read"
    mx.save_safetensors(str(hf / "model.safetensors"), weights)
    return message


@pytest.mark.parametrize(
    "kind",
    [
        "missing config",
        "missing tensor",
        "extra tensor",
        "misshaped tensor",
        "unsupported dtype",
        "unreadable file",
    ],
)
def test_bad_checkpoints_leave_nothing_behind(tmp_path, kind):
    hf = write_random_draft(tmp_path / "hf", TARGET)
    message = corrupt(hf, tmp_path, kind)
    out = tmp_path / "out"
    result = convert_cli("--hf-path", hf, "--mlx-path", out)
    assert result.returncode == 1
    assert message in result.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp dirs either


def test_existing_output_needs_force(tmp_path):
    hf = write_random_draft(tmp_path / "hf", TARGET)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = convert_cli("--hf-path", hf, "--mlx-path", out)
    assert result.returncode == 1 and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    assert convert_cli("--hf-path", hf, "--mlx-path", out, "--force").returncode == 0
    assert not (out / "keep.txt").exists() and load_draft(out) is not None


def test_bad_flags_exit_nonzero(tmp_path):
    hf = write_random_draft(tmp_path / "hf", TARGET)
    for args in (["--dtype", "int8"], ["-q", "--q-bits", "3"], ["--q-group-size", "48"]):
        result = convert_cli("--hf-path", hf, "--mlx-path", tmp_path / "o", *args)
        assert result.returncode != 0 and "invalid choice" in result.stderr
        assert not (tmp_path / "o").exists()


def test_output_dirs_follow_the_umask(tmp_path):
    from dflash_mlx.convert import main

    hf = write_random_draft(tmp_path / "hf", TARGET)
    old = os.umask(0o027)
    try:
        assert main(["--hf-path", str(hf), "--mlx-path", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750  # mkdtemp alone: 0o700
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o640


def test_unwritable_destination_and_force_over_a_file(tmp_path, capsys):
    from dflash_mlx.convert import main

    hf = write_random_draft(tmp_path / "hf", TARGET)
    for dest in ("/proc/dflash-out", "/proc/no/such/dir"):
        assert main(["--hf-path", str(hf), "--mlx-path", dest]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: cannot write {dest}: "), err
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output goes")
    assert main(["--hf-path", str(hf), "--mlx-path", str(blocker / "out")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["--hf-path", str(hf), "--mlx-path", str(blocker), "--force"]) == 0
    assert load_draft(blocker) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "hf"]  # no .blocker.old


def test_help_names_the_command(capsys):
    from dflash_mlx.convert import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: dflash-mlx convert")
    result = subprocess.run(
        [sys.executable, "convert.py", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: python convert.py")
