"""DFlash 2 and Gemma-4 draft config fields: parsed where z-lab's configs keep them,
every bad value an error that names the field."""

import pytest

from dflash_mlx.config import ConfigError, DraftConfig


def dflash2(**changes):
    raw = {
        "architectures": ["DFlash2DraftModel"],
        "model_type": "qwen3",
        "dflash_config": {
            "block_size": 8,
            "mask_token_id": 248070,
            "target_layer_ids": [5, 19, 33, 47, 61],
            "conv_kernel_size": 2,
            "conv_group_size": 16,
            "selector_rank": 256,
            "selector_top_k": 16,
        },
        "is_causal": False,
        "num_target_layers": 64,
        "hidden_size": 5120,
        "intermediate_size": 17408,
        "num_hidden_layers": 5,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "layer_types": ["sliding_attention"] * 5,
        "sliding_window": 2048,
        "rope_theta": 10000000,
        "vocab_size": 248320,
    }
    for k, v in changes.items():
        if k == "dflash_config":
            raw["dflash_config"] = {**raw["dflash_config"], **v}
        else:
            raw[k] = v
    return raw


def test_dflash2_fields():
    cfg = DraftConfig.from_dict(dflash2())
    assert cfg.is_dflash2 and cfg.architecture == "DFlash2DraftModel"
    assert (cfg.conv_kernel_size, cfg.conv_group_size) == (2, 16)
    assert (cfg.selector_rank, cfg.selector_top_k) == (256, 16)
    assert cfg.is_causal is False and not cfg.layer_causal("sliding_attention")
    assert cfg.input_embedding_scale == 1.0 and cfg.output_multiplier == 1.0
    assert cfg.final_logit_softcapping is None
    # Round trip through the HF layout, with the fields where z-lab keeps them.
    d = cfg.to_dict()
    assert d["architectures"] == ["DFlash2DraftModel"] and d["is_causal"] is False
    assert d["dflash_config"]["selector_top_k"] == 16
    assert DraftConfig.from_dict(d) == cfg


def test_gemma4_fields():
    raw = dflash2(
        architectures=["DFlashDraftModel"],
        dflash_config={"input_embedding_scale": 0.5, "output_multiplier": 2.0},
        final_logit_softcapping=30.0,  # top level, as Gemma configs write it
        is_causal=None,
        layer_types=["sliding_attention"] * 4 + ["full_attention"],
    )
    cfg = DraftConfig.from_dict(raw)
    assert not cfg.is_dflash2 and cfg.conv_kernel_size is None
    assert cfg.final_logit_softcapping == 30.0
    assert (cfg.input_embedding_scale, cfg.output_multiplier) == (0.5, 2.0)
    # z-lab's default: sliding layers causal, full layers bidirectional.
    assert cfg.layer_causal("sliding_attention") and not cfg.layer_causal("full_attention")
    assert DraftConfig.from_dict(cfg.to_dict()) == cfg
    # A softcap of 0 is "off", as z-lab reads it.
    assert (
        DraftConfig.from_dict({**raw, "final_logit_softcapping": 0}).final_logit_softcapping is None
    )
    # A DFlash 1 config is written exactly as before (no new keys).
    plain = DraftConfig.from_dict(dflash2(architectures=["DFlashDraftModel"], is_causal=None))
    d = plain.to_dict()
    assert "is_causal" not in d
    assert set(d["dflash_config"]) == {"mask_token_id", "target_layer_ids", "block_size"}


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"architectures": ["DFlash3DraftModel"]}, "architectures"),
        ({"dflash_config": {"conv_kernel_size": None}}, "conv_kernel_size"),
        ({"dflash_config": {"conv_group_size": 0}}, "conv_group_size"),
        ({"dflash_config": {"conv_group_size": 48}}, "conv_group_size"),  # 5120 % 48
        ({"dflash_config": {"selector_rank": 2.5}}, "selector_rank"),
        ({"dflash_config": {"selector_top_k": True}}, "selector_top_k"),
        ({"dflash_config": {"selector_top_k": 300000}}, "selector_top_k"),
        ({"is_causal": "yes"}, "is_causal"),
        ({"final_logit_softcapping": -1.0}, "final_logit_softcapping"),
        ({"final_logit_softcapping": "30"}, "final_logit_softcapping"),
        ({"dflash_config": {"input_embedding_scale": 0.0}}, "input_embedding_scale"),
        ({"dflash_config": {"input_embedding_scale": float("nan")}}, "input_embedding_scale"),
        ({"dflash_config": {"output_multiplier": float("inf")}}, "output_multiplier"),
        ({"dflash_config": {"output_multiplier": -2}}, "output_multiplier"),
    ],
)
def test_bad_fields_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        DraftConfig.from_dict(dflash2(**changes))
