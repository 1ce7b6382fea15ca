"""Model directories that must not run code or cost earlier results (session 36's probe of many model directories):
code a directory ships never runs (transformers' trust_remote_code=False, no prompt), and a model that cannot load
leaves the job's files as they were."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchllm import LLM
from batchllm.models.spec import ModelLoadError

ROOT = Path(__file__).resolve().parents[2]


def _code_writing(marker: Path, base: str) -> str:
    """Python source that writes `marker` when imported, then defines what `base` names (a transformers class)."""
    return (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
            f"from transformers import {base}\n")


def _with_tokenizer_code(model: Path, marker: Path) -> Path:
    """`model` with a tokenizer_config.json mapping AutoTokenizer to a tokenization_my.py that writes `marker`."""
    (model / "tokenization_my.py").write_text(_code_writing(marker, "PreTrainedTokenizerFast")
                                              + "class MyTokenizerFast(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="MyTokenizerFast",
                  auto_map={"AutoTokenizer": [None, "tokenization_my.MyTokenizerFast"]})
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def test_tokenizer_code_in_a_model_directory_never_runs_nor_prompts(tmp_path, tiny_model_factory):
    """AutoTokenizer.from_pretrained(path) without trust_remote_code asked "Do you wish to run the custom code? [y/N]"
    (`echo y |` ran it) and --trust-remote-code, accepted and ignored, then met transformers' request for
    trust_remote_code=True. Now the job is refused before it writes, with BatchLLM's rule, whatever stdin answers."""
    marker = tmp_path / "REMOTE_CODE_RAN"
    model = _with_tokenizer_code(Path(shutil.copytree(tiny_model_factory("llama"), tmp_path / "m")), marker)
    (src := tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "Hi"}\n')
    out = tmp_path / "out" / "o.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "batchllm", "run", str(src), "-o", str(out), "--model", str(model),
                           "--trust-remote-code", "--no-progress"], input="y\ny\n", capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    assert not marker.exists(), "the directory's code ran"
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr
    assert "maps AutoTokenizer to tokenization_my.MyTokenizerFast" in done.stderr
    assert "BatchLLM runs no code from model directories (--trust-remote-code" in done.stderr
    assert not out.parent.exists() or not list(out.parent.iterdir()), "nothing is written"
    with pytest.raises(ModelLoadError, match="runs no code from model directories"):
        LLM(str(model), device="cpu", trust_remote_code=True)
    assert not marker.exists()


def test_a_config_class_of_the_directory_is_not_run_by_hf_config(tmp_path, tiny_model_factory, monkeypatch):
    """`llm.model_config.hf_config` read config.json through AutoConfig without trust_remote_code: an auto_map naming
    an AutoConfig class of the directory prompted (or ran it). It is refused now, naming the rule; a config whose
    model_type transformers knows is read by transformers' own class, the directory's code unrun."""
    marker = tmp_path / "CONFIG_CODE_RAN"
    model = Path(shutil.copytree(tiny_model_factory("llama"), tmp_path / "m"))
    (model / "configuration_my.py").write_text(_code_writing(marker, "LlamaConfig")
                                               + "class MyConfig(LlamaConfig):\n    model_type = 'mymodel'\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_my.MyConfig"}
    (model / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # a prompt would read "" (no) rather than hang
    llm = LLM(str(model), device="cpu")
    try:
        assert type(llm.model_config.hf_config).__name__ == "LlamaConfig"
        (model / "config.json").write_text(json.dumps({**config, "model_type": "mymodel"}))
        llm.model_config.__dict__.pop("hf_config", None)
        with pytest.raises(ModelLoadError, match="config class of the directory's own code; BatchLLM runs no code"):
            _ = llm.model_config.hf_config
    finally:
        llm.shutdown()
    assert not marker.exists(), "the directory's code ran"


def _damaged(model: Path, damage: str) -> Path:
    """`model` with what only loading finds wrong: a tensor missing, a shape changed, a truncated safetensors file,
    a broken tokenizer.json, or a tokenizer_config.json left without its tokenizer.json."""
    from safetensors.torch import load_file, save_file

    weights = model / "model.safetensors"
    if damage in ("missing tensor", "shape"):
        tensors = load_file(weights)
        name = "model.layers.1.mlp.up_proj.weight"
        if damage == "missing tensor":
            del tensors[name]
        else:
            tensors[name] = tensors[name][:-1].clone()
        save_file(tensors, str(weights), metadata={"format": "pt"})
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if damage == "tokenizer.json":
        (model / "tokenizer.json").write_text("{'not': json")
    if damage == "no tokenizer.json":
        (model / "tokenizer.json").unlink()
    return model


@pytest.mark.parametrize("damage", ["missing tensor", "shape", "truncated", "tokenizer.json", "no tokenizer.json"])
def test_a_model_that_fails_to_load_leaves_the_jobs_files_as_they_were(tmp_path, capsys, tiny_model_factory, damage):
    """`run` emptied the output and wrote its state file (prepare_output) before the engine loaded the tokenizer and
    weights: a model that failed only then took the previous results with it under --overwrite (2 records -> 0),
    and a fresh job left an empty output and a state file, though README says it fails before writing anything."""
    from batchllm import cli

    good = tiny_model_factory("llama")
    bad = _damaged(Path(shutil.copytree(good, tmp_path / "bad")), damage)
    (src := tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Yo"}\n')
    out = tmp_path / "out" / "o.jsonl"
    state = out.with_name("o.jsonl.batchllm-state")
    common = ["run", str(src), "-o", str(out), "--no-progress", "--max-tokens", "2"]
    assert cli.main([*common, "--model", good]) == 0
    before = out.read_bytes(), state.read_bytes()
    assert len(before[0].splitlines()) == 2
    capsys.readouterr()
    assert cli.main([*common, "--model", str(bad), "--overwrite"]) == 2
    assert "error" in capsys.readouterr().err
    assert (out.read_bytes(), state.read_bytes()) == before, "the previous results are kept"
    fresh = tmp_path / "fresh" / "o.jsonl"
    assert cli.main(["run", str(src), "-o", str(fresh), "--no-progress", "--model", str(bad)]) == 2
    assert not fresh.parent.exists(), "a fresh job that could not load writes nothing (not even its folder)"


def _gguf_bytes(pairs: list[tuple[str, int, bytes]]) -> bytes:
    """A GGUF v3 header (no tensors) with `pairs`: (key, GGUFValueType, the value's encoded bytes)."""
    import struct

    head = b"GGUF" + struct.pack("<IQQ", 3, 0, len(pairs))
    return head + b"".join(struct.pack("<Q", len(k)) + k.encode() + struct.pack("<I", kind) + value
                           for k, kind, value in pairs)


def _gguf_string(text: str) -> bytes:
    import struct

    return struct.pack("<Q", len(text.encode())) + text.encode()


def test_a_gguf_of_an_architecture_not_run_is_refused_from_its_header(tmp_path, monkeypatch):
    """A gemma2 GGUF was dequantized to float32 into the cache in full, then refused naming the cache's config.json.
    Its header's general.architecture refuses it now, naming the user's file, before anything is converted."""
    import gguf
    import numpy as np

    from batchllm.models import default_model

    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny-gemma2.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setattr(default_model, "_convert", lambda *a: pytest.fail("converted before the check"))
    with pytest.raises(ModelLoadError, match=r"the GGUF model '.*tiny-gemma2.gguf' is a 'gemma2' model \(its "
                                             r"general.architecture\); BatchLLM runs llama, mistral, qwen2, qwen3"):
        LLM(str(path), device="cpu")
    assert not (tmp_path / "cache").exists()
    import struct

    from batchllm.models.default_model import gguf_architecture

    later = tmp_path / "later.gguf"  # the key after others: strings, a string array, scalars, skipped unread
    later.write_bytes(_gguf_bytes([("general.name", 8, _gguf_string("x")),
                                   ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + _gguf_string("a")
                                    + _gguf_string("bc")),
                                   ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2) + bytes(8)),
                                   ("x.count", 4, struct.pack("<I", 7)),
                                   ("general.architecture", 8, _gguf_string("qwen3"))]))
    assert gguf_architecture(later) == "qwen3"
    assert gguf_architecture(path) == "gemma2"


def test_a_directory_holding_only_a_gguf_file_names_it(tmp_path):
    """`--model DIR` with DIR holding a .gguf said only "has no config.json: not a Hugging Face model directory"."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"holds a GGUF file \(tiny.Q8_0.gguf\): give the file as the model, "
                                             r"as in --model '.*m/tiny.Q8_0.gguf'"):
        LLM(str(tmp_path / "m"), device="cpu")


def _config_dir(tmp_path, name: str, **fields) -> Path:
    """A model directory holding only a small config.json (`read_model_spec` reads no more), `fields` set over it
    (None: the key left out)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 256, "max_position_embeddings": 4096}
    config.update(fields)
    (directory := tmp_path / name).mkdir()
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return directory


@pytest.mark.parametrize("key", ["n_positions", "max_seq_len", "seq_length", "max_target_positions",
                                 "max_sequence_length", "max_seq_length", "seq_len"])
def test_the_context_is_the_smallest_of_the_keys_vllm_reads(tmp_path, key):
    """spec.read_model_spec read max_position_embeddings alone: a config whose seq_length (n_positions, ...) is
    smaller ran past it, where vLLM 0.26 (`derive_max_model_len_and_key`) takes the smallest key set."""
    from batchllm.inputs import read_model_source

    source = read_model_source(_config_dir(tmp_path, "m", **{key: 128}))
    assert (source.spec.context, source.max_model_len) == ((128, key), 128)
    assert read_model_source(_config_dir(tmp_path, "larger", **{key: 8192})).max_model_len == 4096
    with pytest.raises(ValueError, match=f"max_model_len 200 exceeds what the model supports \\(128; its config's "
                                         f"{key}"):
        read_model_source(_config_dir(tmp_path, "asked", **{key: 128}), 200)


@pytest.mark.parametrize("model_type, architecture", [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                                                      ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_a_config_without_max_position_embeddings_gets_its_config_class_default(tmp_path, model_type, architecture):
    """A config without max_position_embeddings ran with 2048 whatever its model; transformers' config class (and so
    vLLM, which reads it) gives its own default: Qwen2Config 32768, MistralConfig 131072."""
    from transformers import AutoConfig

    from batchllm.inputs import read_model_source

    expected = AutoConfig.for_model(model_type).max_position_embeddings
    directory = _config_dir(tmp_path, "m", architectures=[architecture], model_type=model_type,
                            max_position_embeddings=None)
    config = json.loads((directory / "config.json").read_text())  # no window (Mistral v0.2's null): the whole context
    (directory / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    source = read_model_source(directory)
    assert (source.spec.context, source.max_model_len) == ((expected, "max_position_embeddings"), expected)


@pytest.mark.parametrize("model_type, architecture", [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                                                      ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
@pytest.mark.parametrize("key", ["num_key_value_heads", "head_dim", "sliding_window"])
def test_a_config_without_a_shape_key_gets_its_config_class_default(tmp_path, model_type, architecture, key):
    """Other keys were read with no class default either: a Mistral config without sliding_window ran with no window
    (MistralConfig's is 4096: different tokens past it), one without num_key_value_heads with one per head
    (MistralConfig: 8), a Qwen3 one without head_dim with hidden size over heads (Qwen3Config: 128), refused as its
    weights' shapes not matching config.json. Each is now what transformers' config object (and so vLLM) holds."""
    from transformers import AutoConfig

    from batchllm.models.spec import read_model_spec

    shape = {"hidden_size": 512, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 64,
             "sliding_window": 1024, "use_sliding_window": True, "max_window_layers": 0}
    shape.pop(key)
    expected = AutoConfig.for_model(model_type, **shape)
    spec = read_model_spec(_config_dir(tmp_path, "m", architectures=[architecture], model_type=model_type,
                                       **shape, **{key: None}))  # (None: left out of config.json)
    expected_head_dim = getattr(expected, "head_dim", None) or 512 // 32
    assert (spec.num_kv_heads, spec.head_dim) == (expected.num_key_value_heads, expected_head_dim), key
    slides = not model_type.startswith("qwen") or "sliding_attention" in (getattr(expected, "layer_types", None) or [])
    assert spec.sliding_window == (getattr(expected, "sliding_window", None) if slides else None), key  # (a layer's)


def test_model_max_length_wins_a_null_context_is_vllms_default_and_a_linear_factor_scales_the_smallest(tmp_path):
    """vLLM: a truthy model_max_length (Command-R's) over every other key, larger or not; no key set (a null
    max_position_embeddings) -> 2048 with a warning; a linear rope factor scales the derived context."""
    from batchllm.inputs import read_model_source

    assert read_model_source(_config_dir(tmp_path, "cmdr", model_max_length=8192, seq_length=64)).spec.context == (
        8192, "model_max_length")
    config = _config_dir(tmp_path, "none", max_position_embeddings=None)
    text = json.loads((config / "config.json").read_text())
    (config / "config.json").write_text(json.dumps({**text, "max_position_embeddings": None}))
    assert read_model_source(config).spec.context == (2048, "vLLM's default")
    scaled = read_model_source(_config_dir(tmp_path, "linear", seq_length=128,
                                           rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert scaled.max_model_len == 256
    with pytest.raises(ModelLoadError, match="seq_length must be a positive number, not 'long'"):
        read_model_source(_config_dir(tmp_path, "bad", seq_length="long"))
