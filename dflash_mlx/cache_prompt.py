"""`dflash-mlx cache_prompt`: `mlx_lm cache_prompt` for a target and its DFlash draft.

The file holds the target's KV cache of the prompt and the draft's context of the same
positions; `dflash-mlx generate --prompt-cache-file FILE -p QUESTION` then processes only
the question. Same options as mlx_lm's, plus --draft-model and --prefill-step-size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

from .convert import check_writable
from .generate import add_kv_cache_arguments, add_prefill_argument, check_kv_cache_arguments


def setup_arg_parser() -> argparse.ArgumentParser:
    """Set up and return the argument parser."""
    parser = argparse.ArgumentParser(
        prog="dflash-mlx cache_prompt",
        description="Cache the state of a prompt to be reused with dflash-mlx generate",
    )
    parser.add_argument(
        "--model",
        type=str,
        default=None,
        help="The path to the local model directory or Hugging Face repo "
        "(default: the demo target).",
    )
    parser.add_argument(
        "--draft-model",
        type=str,
        default=None,
        help="The DFlash draft for the model: a converted or published checkpoint "
        "directory, or Hugging Face repo (default: the demo draft, for the demo target).",
    )
    parser.add_argument(
        "--adapter-path",
        type=str,
        help="Optional path for the trained adapter weights and config.",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Enable trusting remote code for tokenizer",
    )
    parser.add_argument(
        "--eos-token",
        type=str,
        default=None,
        help="End of sequence token for tokenizer",
    )
    parser.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        help="Set the maximum key-value cache size",
    )
    parser.add_argument(
        "--prompt-cache-file",
        help="The file to save the prompt cache in",
        required=True,
    )
    parser.add_argument(
        "--prompt",
        required=True,
        help="Message to be processed by the model ('-' reads from stdin)",
    )
    add_kv_cache_arguments(parser)
    add_prefill_argument(parser)
    return parser


def output_path(prompt_cache_file: str) -> Path:
    """Where the cache lands: mlx saves safetensors under a name ending in .safetensors."""
    path = Path(prompt_cache_file)
    return path if path.suffix == ".safetensors" else Path(f"{path}.safetensors")


def _check_args(args: argparse.Namespace) -> Path:
    check_kv_cache_arguments(args)
    out = output_path(args.prompt_cache_file)
    # Checked before the prefill, which may take minutes.
    for path in (Path(args.prompt_cache_file), out):
        if path.is_dir():
            raise ValueError(f"--prompt-cache-file {path} is a directory")
    if not out.parent.is_dir():
        raise ValueError(f"--prompt-cache-file {out}: no such directory {out.parent}")
    check_writable(out)
    return out


def run(args: argparse.Namespace) -> Path:
    out = _check_args(args)

    from .generate import _model_paths, _read_prompt, check_pair
    from .loading import load, load_draft
    from .session import make_prompt_cache, prefill_prompt_cache, save_prompt_cache

    prompt = _read_prompt(args.prompt)
    model_path, draft_path = _model_paths(args, {})

    tokenizer_config = {"trust_remote_code": args.trust_remote_code}
    if args.eos_token is not None:
        tokenizer_config["eos_token"] = args.eos_token
    model, tokenizer = load(
        model_path,
        adapter_path=args.adapter_path,
        tokenizer_config=tokenizer_config,
        trust_remote_code=args.trust_remote_code,
    )
    draft = load_draft(draft_path)
    check_pair(model, draft)

    if tokenizer.has_chat_template:
        # The start of a user message, left open: generate appends the rest of it.
        messages = [{"role": "user", "content": prompt}]
        tokens = tokenizer.apply_chat_template(
            messages, add_generation_prompt=False, continue_final_message=True
        )
    else:
        tokens = tokenizer.encode(prompt)
    if not tokens:
        raise ValueError("the prompt is empty")

    cache = make_prompt_cache(model, draft, max_kv_size=args.max_kv_size)
    start = time.time()
    max_msg_len = 0

    def callback(processed: int, total_tokens: int) -> None:
        nonlocal max_msg_len
        speed = processed / max(time.time() - start, 1e-9)
        msg = f"\rProcessed {processed:6d} tokens ({speed:6.2f} tok/s)"
        max_msg_len = max(max_msg_len, len(msg))
        print(msg + " " * (max_msg_len - len(msg)), end="", flush=True)

    prefill_prompt_cache(
        model,
        draft,
        mx.array(tokens),
        cache,
        prefill_step_size=args.prefill_step_size,
        progress_callback=callback,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
    )
    print()
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")

    print("Saving...")
    metadata = {
        "model": model_path,
        "draft_model": draft_path,
        "tokenizer_config": json.dumps(tokenizer_config),
    }
    # Saved beside under a temporary name, then renamed: never a half-written cache file.
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.safetensors")
    try:
        save_prompt_cache(str(tmp), cache, model, draft, metadata=metadata)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"Saved the prompt cache of {len(tokens)} tokens to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
