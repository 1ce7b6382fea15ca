import json

import pytest

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
