"""One process of a distributed test (tests/test_distributed.py starts one per rank).

    python tests/distributed_worker.py SPEC.json OUT_DIR

SPEC.json is a list of jobs; each job loads its target sharded (`mode`: "tensor" or
"pipeline"), generates with `dflash_mlx.distributed.stream_generate`, and this rank
writes OUT_DIR/rank{r}.json: per job the tokens it got, or the error it raised.
A job: {"name", "target", "draft", "mode", "prompt": [ids], "max_tokens",
"block_size", "temp", "seed", "options": {more stream_generate keywords}, "oracle":
[reference ids] or null}; mode "mlx_lm-pipeline" loads with mlx_lm's own pipeline split.
With "oracle", rank 0 drafts the reference (wrong at a different block position every
cycle, so every accept length and rollback depth occurs); the reference is mlx_lm's own
greedy output. A job {"name", "kind": "prompt_cache", "sizes": [[bytes per entry] per
rank], "max_bytes"} inserts entries of those sizes into `serve.SharedPromptCache` and
returns which of them it kept ("kept").
"""

import json
import sys
import time
from pathlib import Path

import mlx.core as mx

from dflash_mlx import distributed, load_draft
from dflash_mlx.drafter import DraftModel


class OracleDraft(DraftModel):
    traceable = False  # scripted on the host: the loop runs it eagerly

    def __init__(self, config, reference, errors):
        super().__init__(config)
        self.reference, self.errors, self.cycle = reference, errors, 0

    def __call__(self, block, context=None, cache=None, context_window=None):
        start = cache[0].offset  # the anchor's position
        L = block.shape[1]
        proposal = list(self.reference[start + 1 : start + L])
        proposal += [0] * (L - 1 - len(proposal))
        err = self.errors[self.cycle % len(self.errors)]
        self.cycle += 1
        if err is not None and err < len(proposal):
            proposal[err] = (proposal[err] + 1) % self.config.vocab_size
        return mx.array([[0] + proposal])

    def logits(self, proposal):
        return mx.eye(self.config.vocab_size)[proposal] * 30.0


class Sized:
    """A stand-in prompt-cache entry part of a given size (what LRUPromptCache reads)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def is_trimmable(self) -> bool:
        return False


def prompt_cache_job(job: dict) -> dict:
    from dflash_mlx.serve import SharedPromptCache

    group = distributed.world()
    lru = SharedPromptCache(10, job["max_bytes"], group)
    sizes = job["sizes"][group.rank()]
    for i, size in enumerate(sizes):
        lru.insert_cache("m", [i], [Sized(size)])
    return {"kept": [lru.fetch_nearest_cache("m", [i])[0] is not None for i in range(len(sizes))]}


def run(job: dict) -> dict:
    if job.get("kind") == "prompt_cache":
        return prompt_cache_job(job)
    tic = time.perf_counter()
    if job["mode"] == "mlx_lm-pipeline":  # mlx_lm's own pipeline split
        from mlx_lm.utils import sharded_load

        model, tokenizer = sharded_load(job["target"], pipeline_group=distributed.world())
    else:
        model, tokenizer = distributed.load(job["target"], pipeline=job["mode"] == "pipeline")
    draft = load_draft(job["draft"])
    B = job.get("block_size") or draft.block_size
    if job.get("oracle"):
        errors = [None, *range(B - 1)]
        draft = OracleDraft(draft.config, job["prompt"] + job["oracle"], errors)
    mx.random.seed(job.get("seed", 0))
    tokens, accepted = [], []
    for r in distributed.stream_generate(
        model,
        draft,
        tokenizer,
        job["prompt"],
        job["max_tokens"],
        temp=job.get("temp", 0.0),
        block_size=B,
        **job.get("options", {}),
    ):
        tokens.append(r.token)
        accepted.append(r.accepted)
    return {"tokens": tokens, "accepted": accepted, "seconds": time.perf_counter() - tic}


def main() -> None:
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    rank = distributed.world().rank()
    results = {}
    for job in spec:
        try:
            results[job["name"]] = run(job)
        except ValueError as e:
            results[job["name"]] = {"error": str(e)}
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
