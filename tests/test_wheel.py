"""A built wheel, installed into a fresh virtualenv, runs the offline demo from any
directory: the demo pair is package data, and `dflash-mlx` is the installed script."""

import os
import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_installs_and_runs_the_demo_offline(tmp_path):
    # Build from a copy of what the sdist would hold, so the checkout gets no build/ dir.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "dflash_mlx", src / "dflash_mlx", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            tmp_path / "dist",
            src,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("dflash_mlx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("target/model.safetensors", "target/tokenizer.json", "draft/model.safetensors"):
        assert f"dflash_mlx/demo_pair/{f}" in names, f
    assert any(n.endswith(".dist-info/LICENSE") or "licenses/LICENSE" in n for n in names)

    # A fresh venv; its dependencies (mlx, mlx-lm, ...) come from this interpreter's
    # site-packages, so nothing is downloaded.
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "install",
            "--no-deps",
            "--no-index",
            wheel,
        ],
        check=True,
        capture_output=True,
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": f"{venv / 'bin'}:/usr/bin:/bin"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    origin = subprocess.run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('dflash_mlx').origin)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        check=True,
    ).stdout.strip()
    assert origin.startswith(str(venv)), origin  # the wheel's copy, not the checkout

    result = subprocess.run(
        [venv / "bin" / "dflash-mlx", "generate", "-m", "8"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "Generation: 8 tokens" in result.stdout and "Acceptance length (tau)" in result.stdout
    assert os.listdir(elsewhere) == []  # nothing written where it ran
