"""The tap records hidden states without changing outputs, and leaves no trace."""

import mlx.core as mx
import pytest
from mlx_lm.models import qwen3
from mlx_lm.models.base import create_attention_mask

from dflash_mlx.tap import embedding_and_head, tap_hidden_states


def tiny_qwen3(seed, tie=False):
    mx.random.seed(seed)
    model = qwen3.Model(
        qwen3.ModelArgs(
            model_type="qwen3",
            hidden_size=32,
            num_hidden_layers=4,
            intermediate_size=64,
            num_attention_heads=4,
            rms_norm_eps=1e-6,
            vocab_size=64,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_theta=10000.0,
            head_dim=8,
            tie_word_embeddings=tie,
        )
    )
    mx.eval(model.parameters())
    return model


def manual_hidden_states(model, ids):
    """transformers' hidden_states: embeddings, then each layer's output, last one normed."""
    h = model.model.embed_tokens(ids)
    mask = create_attention_mask(h, None)
    states = [h]
    for layer in model.model.layers:
        h = layer(h, mask, None)
        states.append(h)
    states[-1] = model.model.norm(h)
    return states


def test_features_are_the_tapped_layers_outputs():
    model = tiny_qwen3(0)
    ids = mx.array([[1, 2, 3, 4, 5]])
    states = manual_hidden_states(model, ids)
    with tap_hidden_states(model, [0, 2, 3]) as tap:
        logits = model(ids)
        features = tap.features()
    expected = mx.concatenate([states[1], states[3], states[4]], axis=-1)
    assert mx.allclose(features, expected, atol=1e-5)
    assert mx.array_equal(logits, model(ids))


def test_tap_is_removed_after_an_exception_and_touches_one_model_only():
    a, b = tiny_qwen3(0), tiny_qwen3(1)
    ids = mx.array([[3, 1, 4]])
    cls = type(a.model.layers[1])
    with pytest.raises(KeyboardInterrupt), tap_hidden_states(a, [1]):
        assert type(a.model.layers[1]) is not cls
        assert type(b.model.layers[1]) is cls and type(a.model.layers[0]) is cls
        raise KeyboardInterrupt
    assert type(a.model.layers[1]) is cls
    assert "_dflash_hook" not in a.model.layers[1].__dict__
    # Two taps on two models at once record their own model only.
    with tap_hidden_states(a, [1]) as ta, tap_hidden_states(b, [1]) as tb:
        a(ids)
        b(ids)
        fa, fb = ta.features(), tb.features()
    assert mx.allclose(fa, manual_hidden_states(a, ids)[2], atol=1e-5)
    assert mx.allclose(fb, manual_hidden_states(b, ids)[2], atol=1e-5)


def test_bad_layer_ids_are_errors_and_nested_taps_both_record():
    model = tiny_qwen3(0)
    cls = type(model.model.layers[1])
    with pytest.raises(ValueError, match="out of range"), tap_hidden_states(model, [4]):
        pass
    ids = mx.array([[2, 7, 1]])
    # Two sessions on one model (e.g. a server's two sequences, run in turn): each tap
    # sees the forward that ran, and both are undone in order.
    with tap_hidden_states(model, [1]) as outer, tap_hidden_states(model, [1, 2]) as inner:
        model(ids)
        f_outer, f_inner = outer.features(), inner.features()
    states = manual_hidden_states(model, ids)
    assert mx.allclose(f_outer, states[2], atol=1e-5)
    assert mx.allclose(f_inner, mx.concatenate([states[2], states[3]], axis=-1), atol=1e-5)
    assert type(model.model.layers[1]) is cls
    assert "_dflash_hook" not in model.model.layers[1].__dict__


@pytest.mark.parametrize("tie", [False, True])
def test_embedding_and_head(tie):
    model = tiny_qwen3(0, tie=tie)
    embed, head = embedding_and_head(model)
    ids = mx.array([[1, 2]])
    h = model.model.norm(
        model.model.layers[-1](
            model.model.layers[-2](
                model.model.layers[-3](
                    model.model.layers[0](embed(ids), "causal", None), "causal", None
                ),
                "causal",
                None,
            ),
            "causal",
            None,
        )
    )
    assert mx.allclose(head(h), model(ids), atol=1e-5)
