"""`load_tokenizer` hands AutoTokenizer a plain config with what it reads of the model's config.json
(`tokenizer_choice_config`) instead of letting it load the model's config class, whose import pulls in
`torch.distributed.tensor` and sympy (transformers 5). The tokenizer that comes back must be the one AutoTokenizer
chooses on its own: the same class and the same tokenizer, over the class names and model types models ship with;
and where it cannot choose, the same failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from batchllm import inputs
from batchllm.inputs import load_tokenizer, tokenizer_choice_config
from batchllm.models.spec import ModelLoadError
from tests.helpers import tokenizer_files

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["The capital of France is Paris.", "  naïve café, 日本\n\tend", "<|im_start|>user\nhi<|im_end|>"]
CLASSES = ["TokenizersBackend", "GPT2Tokenizer", "GPT2TokenizerFast", "PreTrainedTokenizerFast", "LlamaTokenizerFast",
           "Qwen2Tokenizer"]
MODEL_TYPES = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]


def _write_dir(out: Path, tokenizer_source: Path, tokenizer_class: str | None, model_type: str,
               **tokenizer_fields) -> Path:
    """A model directory: `tokenizer_source`'s tokenizer files with tokenizer_config.json's class set (None: the key
    removed) and `tokenizer_fields` added, and a config.json of `model_type`."""
    out.mkdir(parents=True)
    for f in tokenizer_files(tokenizer_source):
        shutil.copy(f, out / f.name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)
    if tokenizer_class is not None:
        config["tokenizer_class"] = tokenizer_class
    (out / "tokenizer_config.json").write_text(json.dumps({**config, **tokenizer_fields}))
    (out / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["LlamaForCausalLM"],
                                                 "vocab_size": 49152}))
    return out


@pytest.fixture(scope="module")
def byte_fallback_dir(tmp_path_factory) -> Path:
    """A SentencePiece-style tokenizer (Unigram over Metaspace with byte fallback, as Llama 2 and Mistral convert)
    saved by transformers."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), "▁", "▁The", "▁capital", "é", "a"]
    tok = Tokenizer(models.Unigram([(p, -1.0 - i / 100) for i, p in enumerate(pieces)], unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    out = tmp_path_factory.mktemp("byte-fallback")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        out)
    return out


def _loaded(path: Path, monkeypatch, *, choose: bool):
    """load_tokenizer(path), with the plain config (`choose`) or with AutoTokenizer loading the model's config; an
    exception is returned, not raised."""
    with monkeypatch.context() as patched:
        if not choose:
            patched.setattr(inputs, "tokenizer_choice_config", lambda _path: None)
        try:
            return load_tokenizer(path)
        except Exception as e:  # noqa: BLE001 - the two ways must fail alike
            return e


def _assert_same(ours, theirs) -> None:
    if isinstance(theirs, Exception):
        assert type(ours) is type(theirs), (ours, theirs)
        return
    assert type(ours) is type(theirs)
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (theirs.bos_token_id, theirs.eos_token_id,
                                                                          theirs.pad_token_id)
    assert ours.chat_template == theirs.chat_template
    assert ours.clean_up_tokenization_spaces == theirs.clean_up_tokenization_spaces
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert ours(text).input_ids == ids
        assert ours.decode(ids) == theirs.decode(ids)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("tokenizer_class", CLASSES)
def test_the_same_tokenizer_as_autotokenizer_chooses(tmp_path, monkeypatch, default_model_dir, tokenizer_class,
                                                     model_type):
    path = _write_dir(tmp_path / "model", Path(default_model_dir), tokenizer_class, model_type)
    assert tokenizer_choice_config(path).model_type == model_type
    _assert_same(_loaded(path, monkeypatch, choose=True), _loaded(path, monkeypatch, choose=False))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma"])
@pytest.mark.parametrize("tokenizer_class", ["LlamaTokenizerFast", "LlamaTokenizer", "TokenizersBackend"])
def test_a_sentencepiece_style_tokenizer_is_chosen_alike(tmp_path, monkeypatch, byte_fallback_dir, tokenizer_class,
                                                         model_type):
    path = _write_dir(tmp_path / "model", byte_fallback_dir, tokenizer_class, model_type)
    assert tokenizer_choice_config(path) is not None
    _assert_same(_loaded(path, monkeypatch, choose=True), _loaded(path, monkeypatch, choose=False))


def test_the_default_model_is_chosen_alike(monkeypatch, default_model_dir):
    path = Path(default_model_dir)
    assert tokenizer_choice_config(path) is not None
    _assert_same(_loaded(path, monkeypatch, choose=True), _loaded(path, monkeypatch, choose=False))


def test_the_plain_config_carries_the_keys_autotokenizer_reads(tmp_path, default_model_dir):
    path = _write_dir(tmp_path / "model", Path(default_model_dir), "GPT2Tokenizer", "qwen2")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer",
                                                  "model_name": "some-model"}))
    choice = tokenizer_choice_config(path)
    assert (choice.model_type, choice.tokenizer_class, choice.model_name, choice._name_or_path) == (
        "qwen2", "Qwen2Tokenizer", "some-model", str(path))


@pytest.mark.parametrize("case", ["no class named", "code mapped", "no config.json", "no model_type",
                                  "config.json not an object"])
def test_autotokenizer_loads_the_config_itself_where_the_class_may_depend_on_it(tmp_path, default_model_dir, case):
    named = None if case == "no class named" else "GPT2Tokenizer"
    fields = {"auto_map": {"AutoTokenizer": [None, "tok.MyTokenizer"]}} if case == "code mapped" else {}
    path = _write_dir(tmp_path / "model", Path(default_model_dir), named, "llama", **fields)
    if case == "no config.json":
        (path / "config.json").unlink()
    elif case == "no model_type":
        (path / "config.json").write_text(json.dumps({"vocab_size": 49152}))
    elif case == "config.json not an object":
        (path / "config.json").write_text("[1, 2]")
    assert tokenizer_choice_config(path) is None


def test_a_missing_tokenizer_is_still_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="holds none of"):
        load_tokenizer(tmp_path)


LOAD = """
import json, sys
from pathlib import Path
from batchllm.inputs import load_tokenizer
before = set(sys.modules)
load_tokenizer(Path(sys.argv[1]))
heavy = ("sympy", "torch.distributed.tensor", "torch._dynamo")
print(json.dumps({name: name in sys.modules and name not in before for name in heavy}))
"""


def test_loading_the_default_tokenizer_imports_no_modeling_stack(default_model_dir):
    """What the plain config is for: transformers 5's AutoConfig imports these (transformers 4 loads no config)."""
    done = subprocess.run([sys.executable, "-c", LOAD, str(default_model_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert not any(imported.values()), f"loading the tokenizer imported {[n for n, new in imported.items() if new]}"
