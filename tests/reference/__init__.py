"""PyTorch reference for DFlash, independent of dflash_mlx and of MLX.

`model`: the draft model read from a published HF checkpoint; `dflash2`: z-lab's DFlash 2
draft (convolutions around attention/MLP, the candidate selector); `decode`: the greedy
speculative loop over a `transformers` target; `checkpoints`: tiny random drafts in the
published format.
"""

from .model import DraftCache, ReferenceDraft, load_reference, make_reference, target_layer_ids

__all__ = ["DraftCache", "ReferenceDraft", "load_reference", "make_reference", "target_layer_ids"]
