"""The front door (`dflash-mlx`, `python -m dflash_mlx`) and the generate / cache_prompt
commands: mlx_lm's flags with mlx_lm's names, defaults and meaning; every bad input is one
line naming the problem, exit 1 (2 for usage), no traceback."""

import importlib
import io
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from conftest import write_random_draft
from mlx_lm import generate as mlx_lm_generate
from mlx_lm.generate import setup_arg_parser as mlx_lm_parser

from dflash_mlx import __version__, cli, demo, load
from dflash_mlx import cache_prompt as cp

gen = importlib.import_module("dflash_mlx.generate")  # the module; the package exports the function

ENV = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def run_module(*args, cwd, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "dflash_mlx", *args],
        capture_output=True,
        input=stdin,
        cwd=cwd,
        env=ENV,
        timeout=300,
        check=False,
    )


def error_line(capsys) -> str:
    """The one stderr line of a failed command (and nothing on stdout)."""
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "=" * 10 not in out, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------- front door


def test_front_door_help_version_and_usage(capsys):
    assert cli.main(["--help"]) == 0 and cli.main(["-h"]) == 0
    out = capsys.readouterr().out
    for command in ("generate", "convert", "train", "benchmark", "cache_prompt", "calibrate"):
        assert f"\n  {command} " in out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dflash-mlx {__version__}"
    assert cli.main([]) == 2
    assert "give a command" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0 and "usage: dflash-mlx generate" in capsys.readouterr().out


def test_front_door_missing_module_or_package(tmp_path, monkeypatch, capsys):
    (tmp_path / "needs_pkg.py").write_text("import no_such_package_for_dflash\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("dflash_mlx.no_such_module", "?"))
    monkeypatch.setitem(cli.COMMANDS, "needy", ("needs_pkg", "?"))
    assert cli.main(["ghost"]) == 1
    assert error_line(capsys) == "error: 'ghost' is not available in this install"
    assert cli.main(["needy"]) == 1
    assert error_line(capsys) == "error: 'needy' needs the 'no_such_package_for_dflash' package"


def test_python_dash_m_is_the_front_door(tmp_path):
    # A binary prompt on stdin, in a real process: one line, exit 1, no traceback.
    result = run_module("generate", "-p", "-", cwd=tmp_path, stdin=b"\xff\xfe\x00binary")
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err
    assert err.strip() == "error: the prompt on stdin is not UTF-8 text: byte 0xff at offset 0"


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dflash_mlx.loading.load", interrupted)
    assert cli.main(["generate"]) == 130
    assert gen.main([]) == 130
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- mlx_lm parity

SHARED = [
    "--trust-remote-code", "--adapter-path", "--extra-eos-token", "--system-prompt",
    "--max-tokens", "--temp", "--top-p", "--min-p", "--top-k", "--xtc-probability",
    "--xtc-threshold", "--min-tokens-to-keep", "--seed", "--ignore-chat-template",
    "--chat-template-config", "--verbose", "--max-kv-size", "--prefill-step-size",
    "--kv-bits", "--kv-group-size", "--quantized-kv-start",
]  # fmt: skip


def _options(parser):
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


def test_generate_flags_are_mlx_lm_flags():
    ours, theirs = _options(gen.setup_arg_parser()), _options(mlx_lm_parser())
    for flag in SHARED:
        a, b = ours[flag], theirs[flag]
        assert a.option_strings == b.option_strings, flag
        assert (a.default, a.nargs, a.help, a.const) == (b.default, b.nargs, b.help, b.const), flag
        assert type(a) is type(b), flag
        if b.type is not None:
            assert a.type is b.type or a.type.__name__ == b.type.__name__, flag
    assert ours["--prompt-cache-file"].help.startswith(theirs["--prompt-cache-file"].help)
    assert ours["--prompt-cache-file"].default is None
    for action in gen.setup_arg_parser()._actions:
        assert action.help, action.option_strings  # help on every option
    # --verbose reads values exactly as mlx_lm does.
    for value in ("False", "f", "F", "false", "0", "no", "True", "t", "yes", "1", "off"):
        assert gen.str2bool(value) == theirs["--verbose"].type(value), value


def test_cache_prompt_flags_are_mlx_lm_flags():
    from mlx_lm.cache_prompt import setup_arg_parser as mlx_lm_cache_parser

    ours, theirs = _options(cp.setup_arg_parser()), _options(mlx_lm_cache_parser())
    for flag, b in theirs.items():
        if flag in ("--help", "--model"):
            continue
        a = ours[flag]
        assert (a.default, a.help, a.required, type(a)) == (b.default, b.help, b.required, type(b))


def _mlx_lm_text(prompt_tokens, max_tokens, **kwargs):
    model, tokenizer = load(str(demo.TARGET))
    return mlx_lm_generate(
        model, tokenizer, mx.array(prompt_tokens), max_tokens=max_tokens, **kwargs
    )


def test_generate_output_equals_mlx_lm(capsys):
    # --verbose F prints only the text; greedy DFlash output is the target's own, so it
    # equals mlx_lm's, also with the KV cache quantized from the first token (--kv-bits).
    _, tokenizer = load(str(demo.TARGET))
    prompt = tokenizer.encode(demo.PROMPT)
    assert gen.main(["-m", "24", "--verbose", "F"]) == 0
    assert capsys.readouterr().out == _mlx_lm_text(prompt, 24) + "\n"
    flags = ["--kv-bits", "8", "--quantized-kv-start", "0"]
    assert gen.main(["-m", "24", "--verbose", "false", *flags]) == 0
    expected = _mlx_lm_text(prompt, 24, kv_bits=8, quantized_kv_start=0)
    assert capsys.readouterr().out == expected + "\n"


def test_cache_prompt_then_generate_equals_mlx_lm(tmp_path, capsys):
    # The demo target has no chat template: the cached prompt is its plain tokens and
    # generate appends the new prompt's tokens (as mlx_lm's cache_prompt / generate do).
    first, second = "class Stack:\n", "    def push(self, item):\n"
    file = tmp_path / "stack.safetensors"
    assert cp.main(["--prompt", first, "--prompt-cache-file", str(file)]) == 0
    assert file.is_file() and [p.name for p in tmp_path.iterdir()] == [file.name]
    capsys.readouterr()
    assert (
        gen.main(["--prompt-cache-file", str(file), "-p", second, "-m", "16", "--verbose", "F"])
        == 0
    )
    _, tokenizer = load(str(demo.TARGET))
    tokens = tokenizer.encode(first) + tokenizer.encode(second)
    assert capsys.readouterr().out == _mlx_lm_text(tokens, 16) + "\n"

    # A cache is refused for another pair, and a file that is no cache is named as such.
    other = write_random_draft(
        tmp_path / "other", {"num_hidden_layers": 6, "hidden_size": 256, "vocab_size": 4096}
    )
    pair = ["--model", str(demo.TARGET), "--draft-model", str(other)]
    assert gen.main(["--prompt-cache-file", str(file), *pair]) == 1
    assert "prompt cache was made for another draft" in error_line(capsys)
    assert gen.main(["--prompt-cache-file", str(demo.TARGET / "model.safetensors")]) == 1
    assert "is not a prompt cache file" in error_line(capsys)


def test_prompt_cache_with_a_chat_template_equals_mlx_lms_own(tmp_path, monkeypatch, capsys):
    # A target with a chat template: the cache holds the open start of the user's message
    # and generate adds the rest of it. mlx_lm's own cache_prompt + generate --
    # prompt-cache-file on the same target is the expectation.
    from tiny_models import load_config, make_target

    target = make_target(tmp_path / "target", "qwen3")
    draft = write_random_draft(tmp_path / "draft", load_config(target), block_size=4)
    first, second = "Here is a long document about caches. ", "What is it about?"

    def mlx_lm_main(module, *args):
        monkeypatch.setattr(sys, "argv", ["mlx_lm", *map(str, args)])
        importlib.import_module(module).main()  # mlx_lm exports functions of these names

    mlx_lm_main("mlx_lm.cache_prompt", "--model", target, "--prompt", first,
                "--prompt-cache-file", tmp_path / "mlx_lm.safetensors")  # fmt: skip
    capsys.readouterr()
    mlx_lm_main("mlx_lm.generate", "--model", target, "--prompt-cache-file",
                tmp_path / "mlx_lm.safetensors", "-p", second, "-m", "12", "--verbose", "F")  # fmt: skip
    expected = capsys.readouterr().out
    assert len(expected) > 12  # 12 tokens of text (the tiny targets do not stop early)

    ours = tmp_path / "ours.safetensors"
    pair = ["--model", str(target), "--draft-model", str(draft)]
    assert cp.main([*pair, "--prompt", first, "--prompt-cache-file", str(ours)]) == 0
    capsys.readouterr()
    # The pair comes from the file's metadata, as mlx_lm takes the model from it.
    assert (
        gen.main(["--prompt-cache-file", str(ours), "-p", second, "-m", "12", "--verbose", "F"])
        == 0
    )
    assert capsys.readouterr().out == expected


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Target and draft directories broken the ways users break them."""
    root = tmp_path_factory.mktemp("broken")
    truncated = root / "truncated"
    shutil.copytree(demo.TARGET, truncated)
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    no_config = root / "no_config"
    shutil.copytree(demo.TARGET, no_config)
    (no_config / "config.json").unlink()
    # A draft made for another target (hidden size 64, 4 layers).
    other = write_random_draft(
        root / "other_draft", {"num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 4096}
    )
    # A draft whose config.json describes other weights than the file holds.
    relabelled = root / "relabelled"
    shutil.copytree(demo.DRAFT, relabelled)
    config = (relabelled / "config.json").read_text()
    (relabelled / "config.json").write_text(
        config.replace('"hidden_size": 256', '"hidden_size": 128')
    )
    assert config != (relabelled / "config.json").read_text()
    return {
        "truncated": truncated,
        "no_config": no_config,
        "other": other,
        "relabelled": relabelled,
        "missing": root / "missing",
    }


BAD = [
    (["--temp", "nan"], "error: --temp must be a finite number"),
    (["--temp", "inf"], "error: --temp must be a finite number"),
    (["--top-p", "1.5"], "--top-p must be in [0, 1]"),
    (["-m", "0"], "--max-tokens must be positive or -1"),
    (["--kv-bits", "7"], "--kv-bits must be one of"),
    (["--kv-group-size", "48"], "--kv-group-size must be"),
    (["--xtc-threshold", "0.7"], "--xtc-threshold must be in [0, 0.5]"),
    (["--min-tokens-to-keep", "0"], "--min-tokens-to-keep must be >= 1"),
    (["--max-kv-size", "0"], "--max-kv-size must be positive"),
    (["--block-size", "0"], "--block-size must be 'auto' or in 1…64, got 0"),
    (["--kv-bits", "4", "--max-kv-size", "64"], "--kv-bits does not work with --max-kv-size"),
    (["--chat-template-config", "[1]"], "--chat-template-config must be a JSON object"),
    (["--chat-template-config", "{{"], "--chat-template-config is not valid JSON"),
    (["--prompt-cache-file", "{missing}"], "--prompt-cache-file {missing}: no such file"),
    (["--model", "{missing}", "--draft-model", "{draft}"], "{missing}: no such directory"),
    (["--model", "{draft}", "--draft-model", "{draft}"], "is a DFlash draft, not a target"),
    (["--model", "{truncated}", "--draft-model", "{draft}"], "cannot read the weights of"),
    (["--model", "{no_config}", "--draft-model", "{draft}"], "has no config.json"),
    (["--model", "{missing}"], "--model needs --draft-model"),
    (["--draft-model", "{other}"], "--draft-model needs --model"),
    (["--model", "{target}", "--draft-model", "{other}"], "draft does not match target"),
    (["--draft-model", "{relabelled}", "--model", "{target}"], "the weights are a draft of"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_generate_bad_input_is_one_line(broken, capsys, args, message):
    paths = {**broken, "target": demo.TARGET, "draft": demo.DRAFT}
    args = [a.format(**paths) for a in args]
    assert gen.main(args) == 1
    line = error_line(capsys)
    assert message.format(**paths) in line
    assert len(line) < 300, line  # a mismatch is summarised, not listed tensor by tensor


def test_generate_usage_errors_exit_2(capsys):
    for args in (["--verbose"], ["--temp", "hot"], ["--no-such-flag"], ["--block-size", "big"]):
        with pytest.raises(SystemExit) as e:
            gen.main(args)
        assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_binary_prompt_and_empty_prompt(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok \xc3\x28")))
    assert gen.main(["-p", "-"]) == 1
    assert (
        error_line(capsys) == "error: the prompt on stdin is not UTF-8 text: byte 0xc3 at offset 3"
    )
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert gen.main(["-p", "-"]) == 1
    assert error_line(capsys) == "error: the prompt is empty"


def test_cache_prompt_bad_output_fails_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("dflash_mlx.loading.load", lambda *a, **k: pytest.fail("loaded"))
    for file, message in (
        (tmp_path / "no" / "c.safetensors", "no such directory"),
        (tmp_path, "is a directory"),
    ):
        assert cp.main(["--prompt", "x", "--prompt-cache-file", str(file)]) == 1
        assert message in error_line(capsys)
    assert cp.main(["--prompt", "x", "--prompt-cache-file", "c", "--kv-bits", "9"]) == 1
    assert "--kv-bits" in error_line(capsys)


def test_ctrl_c_while_the_package_imports_exits_130_quietly():
    """KeyboardInterrupt raised inside the package's imports (as a Ctrl-C during the
    seconds MLX and mlx-lm take to import would): exit 130, no traceback."""
    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def interrupted(name, *a, **k):\n"
        "    if name.startswith('mlx_lm'):\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = interrupted\n"
        "import dflash_mlx\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 130
    assert "Traceback" not in r.stderr


def test_python_m_dflash_mlx_generate_prints_no_runpy_warning():
    r = subprocess.run(
        [sys.executable, "-m", "dflash_mlx.generate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0 and "usage: dflash-mlx generate" in r.stdout
    assert "RuntimeWarning" not in r.stderr


def test_one_token_says_no_cycle_ran(capsys):
    """-m 1 emits the prefill's token: no draft cycle, so no tau and no histogram."""
    assert gen.main(["-m", "1", "--ignore-chat-template"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("=" * 10)
    assert "Acceptance length (tau): n/a (no draft cycle ran)" in out
    assert "Tokens per cycle" not in out
    assert gen.main(["-m", "40", "--ignore-chat-template"]) == 0
    out = capsys.readouterr().out
    assert "tokens per cycle" in out and "Tokens per cycle: " in out
