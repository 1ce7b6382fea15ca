import json
import re

import pytest
import torch

from batchllm.models.spec import ModelLoadError, read_model_spec

BASE = dict(
    architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)


def write(tmp_path, **over):
    cfg = {**BASE, **over}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_old_and_new_rope_keys_are_both_read(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}
    old = read_model_spec(write(tmp_path, rope_theta=5e5, rope_scaling=scaling))
    new = read_model_spec(write(tmp_path, rope_parameters={"rope_theta": 5e5, **scaling}))
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling["factor"] == new.rope_scaling["factor"] == 8.0
    plain = read_model_spec(write(tmp_path, rope_parameters={"rope_theta": 1e4, "rope_type": "default"}))
    assert plain.rope_scaling is None and plain.head_dim == 16


def test_traits_per_architecture(tmp_path):
    assert read_model_spec(write(tmp_path, architectures=["Qwen2ForCausalLM"])).traits.qkv_bias
    q3 = read_model_spec(write(tmp_path, architectures=["Qwen3ForCausalLM"], head_dim=32))
    assert q3.traits.qk_norm and not q3.traits.qkv_bias and q3.head_dim == 32
    # 2 layers x (K and V) x 2 kv heads x 16 dims
    assert read_model_spec(write(tmp_path)).kv_bytes_per_token == 2 * 2 * 2 * 16


def test_a_config_without_architectures_is_read_by_its_model_type(tmp_path):
    """As transformers' Auto classes read it (LlamaConfig().save_pretrained writes no architectures)."""
    plain = {k: v for k, v in BASE.items() if k != "architectures"}
    (tmp_path / "config.json").write_text(json.dumps({**plain, "model_type": "qwen3", "head_dim": 32}))
    assert read_model_spec(tmp_path).traits.qk_norm
    (tmp_path / "config.json").write_text(json.dumps({**plain, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        read_model_spec(tmp_path)


def test_one_architecture_given_as_a_string_is_read(tmp_path):
    """It was walked letter by letter, and refused as "unsupported architecture 'LlamaForCausalLM' ...; supported:
    LlamaForCausalLM"."""
    assert read_model_spec(write(tmp_path, architectures="Qwen3ForCausalLM", head_dim=32)).traits.qk_norm
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'"):
        read_model_spec(write(tmp_path, architectures="GPT2LMHeadModel"))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "cannot read"),
        (lambda d: (d / "config.json").write_text(json.dumps({**BASE, "architectures": ["BertModel"]})),
         "unsupported architecture"),
        (lambda d: (d / "config.json").write_text(json.dumps({k: v for k, v in BASE.items() if k != "vocab_size"})),
         "vocab_size"),
        (lambda d: (d / "config.json").write_text(json.dumps({**BASE, "hidden_act": "gelu"})), "hidden_act"),
    ],
)
def test_broken_directories_fail_with_a_reason(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(ModelLoadError, match=message):
        read_model_spec(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        read_model_spec(tmp_path / "nope")


L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
ORIGINAL = "original_max_position_embeddings"
ACCEPTED_ROPES = [  # the config's rope keys (BASE's max_position_embeddings: 256)
    {"rope_parameters": {**L3, "rope_theta": 5e5}},  # llama3 without an original context: max_position_embeddings
    {"rope_theta": 5e5, "rope_scaling": L3},  # the same, transformers 4's keys
    {"rope_scaling": {**{k: v for k, v in L3.items() if k != "rope_type"}, "type": "llama3"}},  # theta 10000
    {ORIGINAL: 64, "rope_parameters": L3},  # a top-level original context ...
    {ORIGINAL: 64, "rope_parameters": {**L3, ORIGINAL: 128}},  # ... over the rope's own
    {"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},  # rope_parameters' theta
    {"rope_theta": 1e4, "rope_parameters": {**L3, ORIGINAL: 128, "rope_theta": 5e5}},
    {"rope_theta": 1e6, "rope_parameters": {"rope_type": "default"}},  # the top-level theta fills a missing one
    {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}},
    {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 2.0},  # rope_scaling over rope_parameters
     "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
    {ORIGINAL: 64, "rope_parameters": {"rope_type": "yarn", "factor": None}},
]
REFUSED_ROPES = [  # (the config's rope keys, what the message names)
    ({"rope_parameters": {k: v for k, v in L3.items() if k != "low_freq_factor"}}, "lacks low_freq_factor"),
    ({"rope_scaling": {k: v for k, v in L3.items() if k != "high_freq_factor"}}, "rope_scaling lacks high_freq_fac"),
    ({"rope_parameters": {k: v for k, v in L3.items() if k != "factor"}}, "llama3 rope in rope_parameters lacks fa"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5}}, "linear rope in rope_parameters lacks factor"),
    ({"rope_parameters": {"rope_type": "yarn", ORIGINAL: 64}}, "yarn rope in rope_parameters lacks factor"),
    ({"rope_parameters": {"rope_type": "linear", "factor": None}}, "rope_parameters.factor must be a number, not No"),
    ({"rope_parameters": {**L3, "factor": "8"}}, "rope_parameters.factor must be a number, not '8'"),
    ({"rope_parameters": {**L3, "low_freq_factor": None}}, "rope_parameters.low_freq_factor must be a number"),
    ({"rope_parameters": {**L3, ORIGINAL: None}}, f"rope_parameters.{ORIGINAL} must be a number, not None"),
    ({ORIGINAL: None, "rope_parameters": {**L3, ORIGINAL: 64}}, f": {ORIGINAL} must be a number, not None"),
    ({ORIGINAL: 64, "rope_parameters": {"rope_type": "yarn", "factor": 2.0, ORIGINAL: None}}, "must be a positive"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, ORIGINAL: 0}}, "must be a positive number, not 0"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": None}}, "rope_parameters.rope_theta must be a num"),
    ({"rope_theta": None, "rope_parameters": {"rope_type": "default"}}, ": rope_theta must be a number, not None"),
]


def _hf_rotary(model_dir):
    """transformers 5's (inverse frequencies, cos/sin scale) for the config, or None where it refuses it (when it
    reads the config or builds the rotary embedding)."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    try:
        rotary = LlamaRotaryEmbedding(AutoConfig.from_pretrained(model_dir))
    except Exception:  # any failure (KeyError, TypeError, ZeroDivisionError ...) is a refusal
        return None
    return rotary.inv_freq, rotary.attention_scaling


@pytest.mark.parametrize("rope", ACCEPTED_ROPES)
def test_a_rope_transformers_completes_is_completed_as_it_does(tmp_path, rope):
    """A llama3 rope without original_max_position_embeddings failed with a KeyError while the engine was built
    (after the output was begun), and a top-level rope_theta was read over rope_parameters'; transformers 5 fills the
    original context from max_position_embeddings (a top-level one first) and reads the rope dict's theta first
    (the top-level one fills it): the same frequencies and scale, exactly."""
    from batchllm.layers.rotary import attention_factor, inverse_frequencies

    spec = read_model_spec(write(tmp_path, model_type="llama", **rope))
    inv_freq, scale = _hf_rotary(tmp_path)
    assert torch.equal(inverse_frequencies(spec.head_dim, spec.rope_theta, spec.rope_scaling), inv_freq)
    assert attention_factor(spec.rope_scaling) == scale


@pytest.mark.parametrize("rope, message", REFUSED_ROPES)
def test_a_rope_transformers_refuses_is_a_config_error_naming_the_key(tmp_path, rope, message):
    """A rope lacking a key transformers requires failed as "cannot load a tokenizer" (transformers' KeyError when
    the tokenizer read the config) or, with --tokenizer, as a KeyError once the engine was built."""
    write(tmp_path, model_type="llama", **rope)
    assert _hf_rotary(tmp_path) is None
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        read_model_spec(tmp_path)


@pytest.mark.parametrize("over, message", [
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "rope_parameters.partial_rotary_factor 0.5 is not supported"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_attention_heads 4 is not a multiple of "
                                                          "num_key_value_heads 3"),
    (dict(num_attention_heads=0), "num_attention_heads 0 must be positive"),  # (was a bare ZeroDivisionError)
])
def test_a_rotation_or_head_grouping_not_run_here_is_refused_by_name(tmp_path, over, message):
    """A partial_rotary_factor was ignored (the whole head rotated, where vLLM rotates part and transformers fails
    on a scaled rope), and 4 heads over 3 KV heads loaded, then failed inside attention without naming the config
    (on the GPU each KV head would have served one query head, the fourth never computed)."""
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        read_model_spec(write(tmp_path, **over))
    assert read_model_spec(write(tmp_path, partial_rotary_factor=1.0)).head_dim == 16


@pytest.mark.parametrize("architecture, fields, slides", [
    ("MistralForCausalLM", dict(sliding_window=32), True),
    ("MistralForCausalLM", dict(sliding_window=32, layer_types=["full_attention"] * 2), True),
    ("LlamaForCausalLM", dict(sliding_window=32), True),  # (transformers 5's Llama masks by it)
    ("Qwen2ForCausalLM", dict(sliding_window=32, use_sliding_window=False, max_window_layers=0), False),
    ("Qwen2ForCausalLM", dict(sliding_window=32, use_sliding_window=True, max_window_layers=2), False),
    ("Qwen2ForCausalLM", dict(sliding_window=32, use_sliding_window=True, max_window_layers=1), True),
    ("Qwen3ForCausalLM", dict(sliding_window=32, use_sliding_window=True, max_window_layers=0,
                              layer_types=["full_attention"] * 2), False),
    ("Qwen3ForCausalLM", dict(sliding_window=32, use_sliding_window=True), False),  # (max_window_layers 28)
])
def test_the_window_is_kept_where_transformers_slides_a_layer(tmp_path, architecture, fields, slides):
    """Checked against the attention transformers' own model runs on each layer."""
    from transformers import AutoConfig

    model_type = architecture.removesuffix("ForCausalLM").lower()
    config = {**BASE, "architectures": [architecture], "model_type": model_type, "head_dim": 16, **fields}
    spec = read_model_spec(write(tmp_path, **config))
    assert spec.sliding_window == (32 if slides else None)
    hf = AutoConfig.from_pretrained(tmp_path)
    if architecture.startswith("Qwen"):  # (transformers' Qwen layers each follow layer_types)
        assert ("sliding_attention" in hf.layer_types and hf.sliding_window is not None) == slides
