"""Train the demo target: a ~6M-parameter Qwen3 LM on the Python standard library's source.

The corpus is on every machine, offline: the `.py` files of the running interpreter's
standard library. Files are split by a hash of their relative path into

  train  (~92%)  the target learns these;
  draft  (~6%)   prompts for the draft's training data (the target never saw them);
  eval   (~2%)   held-out prompts for measuring tau (seen by neither model).

The draft must learn the target's habits on unseen text, not its recall of memorised
files, hence the split (see DESIGN.md). The script writes an mlx-lm / Hugging Face
model directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)
that `mlx_lm.load` and transformers' Qwen3ForCausalLM both read, and the prompt files:

  draft_prompts.jsonl  short prompts (a few whole lines, 200-400 characters) and, with
                       --draft-long-prompts, long ones: whole lines ending anywhere in the
                       draft split, lengths log-uniform in tokens over [--long-min-tokens,
                       --long-max-tokens] (the split's files joined as the target's
                       training stream joins them, by <|endoftext|>);
  eval_prompts.jsonl   short held-out prompts (eval split), drawn as always;
  eval_long.jsonl      --eval-long-prompts texts of whole lines of the eval split, each
                       at least --eval-long-tokens tokens: the first lines of its longest
                       files (one file each), else windows spread evenly over the joined
                       split; long held-out contexts, to be cut to their last N tokens.

The target trains on random windows of --seq-len tokens of its split; max_position_
embeddings records that length (the contexts it was trained for).

    python examples/train_target.py --out dflash_mlx/demo_pair/target --prompts-dir /tmp/demo
"""

from __future__ import annotations

import argparse
import bisect
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


def save_tokenizer(tok, out: Path, max_positions: int) -> None:
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
        "model_max_length": max_positions,
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


class LineStream:
    """The texts of a split joined into one token stream, as the target's training data
    joins files (<|endoftext|> between them), with the token index of every line start."""

    def __init__(self, texts: list[str], tok):
        self.text = EOS.join(texts)
        starts = [s for s, _ in tok.encode(self.text).offsets]
        self.n_tokens = len(starts)
        # A window is whole lines: it starts at a line start and ends at one (or the end).
        self.lines = [0] + [i + 1 for i, c in enumerate(self.text) if c == "\n"]
        if self.lines[-1] != len(self.text):
            self.lines.append(len(self.text))
        self.line_tokens = [bisect.bisect_left(starts, c) for c in self.lines]

    def window(self, end_line: int, n_tokens: int) -> str:
        """Whole lines ending at line start `end_line`, about n_tokens tokens long."""
        want = self.line_tokens[end_line] - n_tokens
        first = max(0, bisect.bisect_right(self.line_tokens, want) - 1)
        return self.text[self.lines[first] : self.lines[end_line]]

    def windows_from(self, first_line: int, n_tokens: int, tok) -> str:
        """Whole lines from line start `first_line` on, at least n_tokens tokens (as the
        text encodes on its own), or to the end of the stream."""
        goal = self.line_tokens[first_line] + n_tokens
        end = min(bisect.bisect_left(self.line_tokens, goal), len(self.lines) - 1)
        text = self.text[self.lines[first_line] : self.lines[end]]
        while len(tok.encode(text).ids) < n_tokens and end < len(self.lines) - 1:
            end += 1
            text = self.text[self.lines[first_line] : self.lines[end]]
        return text


def long_prompts(stream: LineStream, n: int, lo: int, hi: int, rng: random.Random) -> list[str]:
    """n windows of whole lines ending at random line starts, lengths log-uniform in
    tokens over [lo, hi] (whole lines: within a line or so of the length drawn)."""
    prompts = []
    usable = [i for i, t in enumerate(stream.line_tokens) if t >= lo]
    if not usable:
        raise SystemExit(f"error: the draft split has fewer than --long-min-tokens {lo} tokens")
    for _ in range(n):
        n_tok = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        prompts.append(stream.window(rng.choice(usable), n_tok))
    return prompts


def eval_long_prompts(texts: list[str], n: int, n_tokens: int, tok) -> list[str]:
    """n held-out texts of at least n_tokens tokens, whole lines.

    Each of the split's files that long gives one, its first lines (a context that is
    one file throughout; the longest files first); where fewer files are that long, the
    rest are windows of the joined split, their starts spread evenly over it.
    """
    sizes = [len(e.ids) for e in tok.encode_batch(texts)]
    long_files = sorted((i for i, k in enumerate(sizes) if k >= n_tokens), key=lambda i: -sizes[i])
    windows = [
        LineStream([texts[i]], tok).windows_from(0, n_tokens, tok) for i in sorted(long_files[:n])
    ]
    if len(windows) == n:
        return windows
    stream = LineStream(texts, tok)
    if stream.n_tokens < n_tokens:
        raise SystemExit(
            f"error: the eval split has {stream.n_tokens} tokens, fewer than --eval-long-tokens "
            f"{n_tokens}"
        )
    span, rest = stream.n_tokens - n_tokens, n - len(windows)
    for i in range(rest):
        at = round(i * span / max(rest - 1, 1))
        first = min(bisect.bisect_left(stream.line_tokens, at), len(stream.lines) - 2)
        text = stream.windows_from(first, n_tokens, tok)
        while len(tok.encode(text).ids) < n_tokens and first > 0:  # the end: start earlier
            first -= 1
            text = stream.windows_from(first, n_tokens, tok)
        windows.append(text)
    return windows


def write_prompts(splits: dict[str, list[str]], tok, pdir: Path, args: argparse.Namespace) -> None:
    pdir.mkdir(parents=True, exist_ok=True)
    # The short prompts are drawn as they always were (eval after draft, one generator),
    # the long ones by a generator of their own: adding long prompts changes neither.
    rng = random.Random(args.seed)
    draft = make_prompts(splits["draft"], args.draft_prompts, rng)
    evals = make_prompts(splits["eval"], args.eval_prompts, rng)
    n_long = args.draft_long_prompts
    if n_long:
        stream = LineStream(splits["draft"], tok)
        rng_long = random.Random(f"long-{args.seed}")
        draft += long_prompts(stream, n_long, args.long_min_tokens, args.long_max_tokens, rng_long)
    files = {"draft_prompts.jsonl": draft, "eval_prompts.jsonl": evals}
    if args.eval_long_prompts:
        files["eval_long.jsonl"] = eval_long_prompts(
            splits["eval"], args.eval_long_prompts, args.eval_long_tokens, tok
        )
    for name, prompts in files.items():
        with open(pdir / name, "w") as f:
            f.writelines(json.dumps({"prompt": q}) + "\n" for q in prompts)
    summary = f"[prompts] {args.draft_prompts} short"
    if n_long:
        lengths = sorted(len(ids) for ids in (e.ids for e in tok.encode_batch(draft[-n_long:])))
        summary += (
            f" + {n_long} long draft prompts (tokens: min {lengths[0]}, median "
            f"{lengths[len(lengths) // 2]}, max {lengths[-1]}, total {sum(lengths)})"
        )
    summary += f", {args.eval_prompts} eval prompts"
    if "eval_long.jsonl" in files:
        lengths = [len(tok.encode(q).ids) for q in files["eval_long.jsonl"]]
        summary += f", {len(lengths)} long eval texts ({min(lengths)}-{max(lengths)} tokens)"
    print(f"{summary} in {pdir}", flush=True)


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
        # The longest context trained on (the windows): what serving may rely on.
        "max_position_embeddings": args.seq_len,
        "rope_theta": args.rope_theta,
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
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training window")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--draft-prompts", type=int, default=8192, help="short draft prompts")
    p.add_argument("--draft-long-prompts", type=int, default=0, help="long draft prompts")
    p.add_argument("--long-min-tokens", type=int, default=128)
    p.add_argument("--long-max-tokens", type=int, default=4200)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-long-prompts", type=int, default=0, help="long eval texts (8)")
    p.add_argument("--eval-long-tokens", type=int, default=4200, help="tokens per long text")
    p.add_argument("--max-files", type=int, default=None, help="use fewer files (quick tests)")
    p.add_argument(
        "--prompts-only",
        action="store_true",
        help="write the prompt files and stop (long ones need the tokenizer in --out)",
    )
    args = p.parse_args(argv)
    # Bad values: one line naming the flag (SystemExit prints it, exit status 1).
    for flag in ("steps", "batch_size", "seq_len", "long_min_tokens", "eval_long_tokens"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be positive")
    for flag in ("draft_prompts", "draft_long_prompts", "eval_prompts", "eval_long_prompts"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be >= 0")
    if args.long_max_tokens < args.long_min_tokens:
        raise SystemExit("error: --long-max-tokens must be >= --long-min-tokens")

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

    if args.prompts_only:
        from tokenizers import Tokenizer

        tok = None  # short prompts are characters; long ones are measured in tokens
        if args.draft_long_prompts or args.eval_long_prompts:
            if not (Path(args.out) / "tokenizer.json").exists():
                raise SystemExit(
                    f"error: --prompts-only: long prompts need the tokenizer, and --out "
                    f"{args.out} has no tokenizer.json (train the target first)"
                )
            tok = Tokenizer.from_file(str(Path(args.out) / "tokenizer.json"))
        if args.prompts_dir:
            write_prompts(splits, tok, Path(args.prompts_dir), args)
        return 0

    tok = build_tokenizer(splits["train"], args.vocab_size)
    if args.prompts_dir:
        write_prompts(splits, tok, Path(args.prompts_dir), args)
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
    save_tokenizer(tok, out, args.seq_len)
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
