"""Train the demo target: a ~6M-parameter Qwen3 LM on the Python standard library's source.

The corpus is on every machine, offline: the `.py` files of the running interpreter's
standard library. Files are split by a hash of their relative path into

  train  (~92%)  the target learns these;
  draft  (~6%)   prompts for the draft's training data (the target never saw them);
  eval   (~2%)   held-out prompts for measuring tau (seen by neither model).

The draft must learn the target's habits on unseen text, not its recall of memorised
files, hence the split (see DESIGN.md). The script writes an mlx-lm / Hugging Face
model directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)
that `mlx_lm.load` and transformers' Qwen3ForCausalLM both read, and the prompt files.

    python examples/train_target.py --out dflash_mlx/demo_pair/target --prompts-dir /tmp/demo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_map

EOS, MASK = "<|endoftext|>", "<|mask|>"


def corpus_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of every stdlib .py file, sorted; site-packages excluded."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        files.append((rel, p))
    return files


def split_of(rel: str) -> str:
    """A stable split by path hash, so it agrees across machines and Python versions."""
    h = int(hashlib.md5(rel.encode()).hexdigest()[:8], 16) % 100
    return "eval" if h < 2 else "draft" if h < 8 else "train"


def read_text(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "bos_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        # The draft's mask token; the target never sees it.
        "additional_special_tokens": [MASK],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"eos_token": EOS, "pad_token": EOS, "additional_special_tokens": [MASK]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def make_prompts(texts: list[str], n: int, rng: random.Random) -> list[str]:
    """Windows of a few whole lines (200-400 characters) from random places in `texts`."""
    weights = [len(t) for t in texts]
    prompts = []
    while len(prompts) < n:
        text = rng.choices(texts, weights)[0]
        lines = text.splitlines(keepends=True)
        start = rng.randrange(len(lines))
        chunk = ""
        for line in lines[start:]:
            if len(chunk) >= 200 or len(chunk) + len(line) > 400:
                break
            chunk += line
        if len(chunk.strip()) >= 100:
            prompts.append(chunk)
    return prompts


def write_prompts(splits: dict[str, list[str]], pdir: Path, args: argparse.Namespace) -> None:
    pdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for name, split, n in (
        ("draft_prompts.jsonl", "draft", args.draft_prompts),
        ("eval_prompts.jsonl", "eval", args.eval_prompts),
    ):
        with open(pdir / name, "w") as f:
            f.writelines(
                json.dumps({"prompt": q}) + "\n" for q in make_prompts(splits[split], n, rng)
            )
    print(
        f"[prompts] {args.draft_prompts} draft + {args.eval_prompts} eval prompts in {pdir}",
        flush=True,
    )


def model_config(args: argparse.Namespace, vocab_size: int, eos_id: int) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": args.intermediate,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "hidden_act": "silu",
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": args.dtype,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="dflash_mlx/demo_pair/target", help="model directory to write")
    p.add_argument("--prompts-dir", default=None, help="write draft/eval prompt jsonl files here")
    p.add_argument("--stdlib", default=None, help="corpus root (default: this Python's stdlib)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--draft-prompts", type=int, default=8192)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--max-files", type=int, default=None, help="use fewer files (quick tests)")
    p.add_argument("--prompts-only", action="store_true", help="write the prompt files and stop")
    args = p.parse_args(argv)

    from mlx_lm.models import qwen3
    from mlx_lm.utils import save_config, save_model

    random.seed(args.seed)
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    t0 = time.perf_counter()

    splits: dict[str, list[str]] = {"train": [], "draft": [], "eval": []}
    files = corpus_files(args.stdlib)
    if args.max_files:
        files = files[: args.max_files]
    for rel, path in files:
        if (text := read_text(path)) is not None:
            splits[split_of(rel)].append(text)
    n_chars = {k: sum(map(len, v)) for k, v in splits.items()}
    print(f"[corpus] {len(files)} files; characters per split {n_chars}", flush=True)

    if args.prompts_dir:
        write_prompts(splits, Path(args.prompts_dir), args)
    if args.prompts_only:
        return 0

    tok = build_tokenizer(splits["train"], args.vocab_size)
    eos_id = tok.token_to_id(EOS)
    vocab = tok.get_vocab_size()
    ids = []
    for enc in tok.encode_batch(splits["train"]):
        ids.extend(enc.ids)
        ids.append(eos_id)
    data = np.array(ids, dtype=np.int32)
    print(
        f"[tokens] vocab {vocab}, {data.size / 1e6:.1f}M training tokens "
        f"({n_chars['train'] / data.size:.2f} chars/token), {time.perf_counter() - t0:.0f}s",
        flush=True,
    )

    config = model_config(args, vocab, eos_id)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    # Small-init embeddings: the tied head then starts near uniform.
    model.model.embed_tokens.weight = 0.02 * mx.random.normal(model.model.embed_tokens.weight.shape)
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"[model] {n_params / 1e6:.2f}M parameters", flush=True)

    warmup = optim.linear_schedule(0.0, args.lr, args.warmup)
    cosine = optim.cosine_decay(args.lr, max(1, args.steps - args.warmup), args.lr * 0.1)
    opt = optim.AdamW(
        optim.join_schedules([warmup, cosine], [args.warmup]),
        betas=[0.9, 0.95],
        weight_decay=args.weight_decay,
    )

    def loss_fn(model, x, y):
        logits = model(x).astype(mx.float32)
        return nn.losses.cross_entropy(logits, y, reduction="mean")

    state = [model.state, opt.state]

    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    L, Bsz = args.seq_len, args.batch_size
    rng = np.random.default_rng(args.seed)
    tic, seen, avg = time.perf_counter(), 0, None
    for it in range(1, args.steps + 1):
        starts = rng.integers(0, data.size - L - 1, Bsz)
        batch = np.stack([data[s : s + L + 1] for s in starts])
        loss = step(mx.array(batch[:, :-1]), mx.array(batch[:, 1:]))
        mx.eval(state, loss)
        seen += Bsz * L
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if it % 100 == 0 or it == args.steps:
            el = time.perf_counter() - tic
            print(
                f"[train] step {it}/{args.steps} loss {avg:.3f} "
                f"{seen / el / 1e3:.0f}k tok/s {el:.0f}s",
                flush=True,
            )
        if not math.isfinite(avg):
            raise SystemExit("loss diverged")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(mx, args.dtype)
    model.update(tree_map(lambda v: v.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    save_model(out, model)
    save_config(config, out / "config.json")
    save_tokenizer(tok, out)
    summary = {
        "parameters": n_params,
        "train_tokens": int(data.size),
        "tokens_seen": seen,
        "final_loss": avg,
        "seconds": time.perf_counter() - t0,
        "seed": args.seed,
        "args": vars(args),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[done] wrote {out} in {summary['seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
