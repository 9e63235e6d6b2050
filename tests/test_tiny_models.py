"""The tiny targets load with mlx_lm.load and make varied, well-separated greedy output."""

import json

import mlx.core as mx
import pytest
from mlx import nn
from mlx_lm import generate as mlx_lm_generate
from mlx_lm import load as mlx_lm_load
from mlx_lm import stream_generate as mlx_lm_stream_generate
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache
from tiny_models import (
    FAMILIES,
    MASK_TOKEN,
    SPECIAL_TOKENS,
    load_config,
    make_target,
    make_tokenizer,
    num_layers,
)

PROMPT = [5, 17, 42, 7, 99, 3, 61, 28, 11]
N_TOKENS = 32

F, S, A = KVCache, RotatingKVCache, ArraysCache
CACHE_KINDS = {
    "llama": [F] * 4,
    "mistral": [F] * 4,
    "qwen2": [F] * 4,
    "qwen3": [F] * 4,
    "qwen3_moe": [F] * 4,
    "gpt_oss": [S, F, S, F],
    "gemma3_text": [S, S, F, S, S, F],
    "qwen3_5": [A, A, A, F],
    "qwen3_5_moe": [A, A, A, F],
    "qwen3_next": [A, A, A, F],
}


def greedy(model, tokenizer, prompt, n):
    return list(mlx_lm_stream_generate(model, tokenizer, prompt, max_tokens=n))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_and_generates(tmp_path, family):
    path = make_target(tmp_path / family, family)
    model, tokenizer = mlx_lm_load(str(path))
    config = load_config(path)
    assert model.args.model_type == json.loads((path / "config.json").read_text())["model_type"]
    assert len(model.layers) == num_layers(path) == len(CACHE_KINDS[family])
    assert config["vocab_size"] == len(tokenizer.vocab) == 256

    responses = greedy(model, tokenizer, PROMPT, N_TOKENS)
    tokens = [r.token for r in responses]
    assert len(tokens) == N_TOKENS  # no EOS by chance
    assert len(set(tokens)) >= 8, tokens
    assert not set(tokens) & set(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    text = mlx_lm_generate(model, tokenizer, PROMPT, max_tokens=N_TOKENS)
    assert text == "".join(r.text for r in responses)

    # Teacher-forced, one forward over the whole sequence picks the same tokens as
    # step-by-step decoding: the greedy margins are wide enough to compare token by token.
    logits = model(mx.array([PROMPT + tokens]))
    assert logits[0, len(PROMPT) - 1 : -1].argmax(-1).tolist() == tokens

    cache = make_prompt_cache(model)
    assert [type(c) for c in cache] == CACHE_KINDS[family]
    model(mx.array([PROMPT]), cache=cache)
    assert all(not c.empty() for c in cache)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_next"])
def test_quantized_target(tmp_path, family):
    path = make_target(tmp_path / family, family, quantize_bits=4)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    model, tokenizer = mlx_lm_load(str(path))
    assert isinstance(model.layers[-1].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    tokens = [r.token for r in greedy(model, tokenizer, PROMPT, N_TOKENS)]
    assert len(tokens) == N_TOKENS and len(set(tokens)) >= 8, tokens


def test_seeded_and_distinct(tmp_path):
    weights = lambda p: mx.load(str(p / "model.safetensors"))
    a = weights(make_target(tmp_path / "a", "llama", seed=3))
    b = weights(make_target(tmp_path / "b", "llama", seed=3))
    c = weights(make_target(tmp_path / "c", "mistral", seed=3))
    assert all(v.dtype == mx.float32 for v in a.values())
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    assert not mx.array_equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_overrides(tmp_path):
    path = make_target(tmp_path / "t", "gpt_oss", num_hidden_layers=6, sliding_window=8)
    model, _ = mlx_lm_load(str(path))
    assert len(model.layers) == num_layers(path) == 6
    assert [c.max_size for c in make_prompt_cache(model)[::2]] == [8, 8, 8]


def test_qwen3_5_flat_text_config_loads(tmp_path):
    """mlx_lm reads Qwen3.5 with its text config nested (as published) or flat."""
    path = make_target(tmp_path / "nested", "qwen3_5")
    nested = json.loads((path / "config.json").read_text())
    assert nested["text_config"]["model_type"] == "qwen3_5_text"
    model, _ = mlx_lm_load(str(path))
    expected = model(mx.array([PROMPT]))
    flat = dict(nested["text_config"], model_type="qwen3_5")
    (path / "config.json").write_text(json.dumps(flat))
    model, _ = mlx_lm_load(str(path))
    assert mx.array_equal(model(mx.array([PROMPT])), expected)


def test_tokenizer(tmp_path):
    # mlx_lm.load reads generation_config.json through the model's config.
    path = make_target(tmp_path / "t", "qwen3", generation_eos=["<|endoftext|>", "<|im_end|>"])
    _, tokenizer = mlx_lm_load(str(path))
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == [252, 253, 254, 255]
    assert tokenizer.convert_tokens_to_ids(MASK_TOKEN) == 255
    assert tokenizer.eos_token_ids == {252, 254}
    assert tokenizer.bos_token is None

    text = "".join(map(chr, range(128))) + "Hello, world!  def f(x):\n\treturn x ** 2"
    tokens = tokenizer.encode(text)
    assert len(tokens) < len(text)  # merges happen
    assert tokenizer.decode(tokens) == text
    # mlx_lm's streaming BPE detokenizer turns byte 0 into "Ā" (it tests the decoded
    # byte for truth) and drops a leading space: stream text without either.
    text, tokens = text[1:], tokens[1:]
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for t in tokens:
        detokenizer.add_token(t)
    detokenizer.finalize()
    assert detokenizer.text == text

    messages = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.decode(prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert prompt[0] == ids[1]


def test_tokenizer_vocab_sizes(tmp_path):
    for size in (132, 300, 1024):
        make_tokenizer(tmp_path / str(size), size)
        tokenizer = json.loads((tmp_path / str(size) / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        assert len(vocab) + len(tokenizer["added_tokens"]) == size
        assert tokenizer["added_tokens"][-1] == {**tokenizer["added_tokens"][-1], "id": size - 1}
    with pytest.raises(ValueError):
        make_tokenizer(tmp_path / "small", 100)
