"""Convert a published DFlash draft checkpoint (PyTorch, Hub id or local dir) to MLX."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import DTYPES, CheckpointError, build, read
from .config import ConfigError


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    force: bool = False,
) -> dict:
    """Read, validate, cast/quantize and write atomically. Returns a summary dict."""
    out = Path(mlx_path)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unsupported dtype '{dtype}' (choose from {sorted(DTYPES)})")
    if quantize and q_bits not in (4, 8):
        raise ValueError(f"unsupported --q-bits {q_bits} (choose 4 or 8)")
    if quantize and q_group_size not in (32, 64, 128):
        raise ValueError(f"unsupported --q-group-size {q_group_size} (choose 32, 64 or 128)")
    check_writable(out)  # before a download or a conversion that may take minutes

    config, weights = read(hf_path)
    target_dtype = DTYPES[dtype] if dtype else _source_dtype(weights)
    model = build(
        config,
        weights,
        dtype=target_dtype,
        quantize=(q_group_size, q_bits) if quantize else None,
    )
    params = dict(tree_flatten(model.parameters()))

    # Write next to the destination, then rename: a failure leaves nothing half-written.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a model dir is the user's usual
        mx.save_safetensors(str(tmp / "model.safetensors"), params, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old")
            _remove(old)
            out.rename(old)
            tmp.rename(out)
            _remove(old)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    return {
        "path": str(out),
        "parameters": sum(v.size for v in weights.values()),
        "dtype": str(target_dtype).removeprefix("mlx.core."),
        "bits": config.quantization["bits"] if config.quantization else None,
        "size_mb": (out / "model.safetensors").stat().st_size / 1e6,
    }


def check_writable(out: Path) -> None:
    """A one-line error now if `out` could not be created (read-only place, a file in the way)."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {out}: {parent} is not a directory")
    try:  # really try: access() says yes to root on read-only mounts
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {out}: {parent} is not writable ({e.strerror})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _source_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    for v in weights.values():
        if v.dtype in DTYPES.values():
            return v.dtype
    return mx.float16


def main(argv: list[str] | None = None, prog: str = "dflash-mlx convert") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert a DFlash draft checkpoint (Hub id or local dir) to MLX.",
    )
    parser.add_argument("--hf-path", required=True, help="Hub id or local directory")
    parser.add_argument("--mlx-path", default="mlx_model", help="output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: keep)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize linear layers")
    parser.add_argument(
        "--q-bits", type=int, default=4, choices=[4, 8], help="bits per weight with -q"
    )
    parser.add_argument(
        "--q-group-size",
        type=int,
        default=64,
        choices=[32, 64, 128],
        help="weights per quantization group with -q",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        info = convert(
            args.hf_path,
            args.mlx_path,
            dtype=args.dtype,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            force=args.force,
        )
    except KeyboardInterrupt:
        return 130
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bits = f", {info['bits']}-bit" if info["bits"] else ""
    print(
        f"[INFO] wrote {info['path']}: {info['parameters'] / 1e6:.2f}M parameters, "
        f"{info['dtype']}{bits}, {info['size_mb']:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
