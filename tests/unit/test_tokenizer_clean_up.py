"""A tokenizer config asking for clean-up of tokenization spaces over a BPE model (what older conversions of
SmolLM2 write): transformers 5 skips that clean-up in `decode` and warns once per process. `load_tokenizer`
turns the no-op flag off, so the text is unchanged, the warning is gone and per-token decodes take the Rust
tokenizer (`output_processor._plain_backend`); a tokenizer that forces the clean-up keeps it."""

from __future__ import annotations

import json
import shutil

import pytest

from batchllm.inputs import load_tokenizer
from batchllm.output_processor import _plain_backend, text_decoder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_dir(tmp_path, default_model_dir, **config_fields):
    """A copy of the default model's tokenizer files with `config_fields` set in tokenizer_config.json."""
    for name in TOKENIZER_FILES:
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(config_fields)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def _needs_bpe_skip(tokenizer):
    if not hasattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
        pytest.skip("transformers 4 cleans up BPE text: the flag is not a no-op there")


def test_clean_up_flag_that_decode_ignores_is_turned_off_with_the_same_text(tmp_path, default_model_dir):
    from transformers import AutoTokenizer

    path = _tokenizer_dir(tmp_path, default_model_dir, clean_up_tokenization_spaces=True)
    as_configured = AutoTokenizer.from_pretrained(str(path))
    _needs_bpe_skip(as_configured)
    assert as_configured.clean_up_tokenization_spaces is True
    loaded = load_tokenizer(path)
    assert loaded.clean_up_tokenization_spaces is False
    assert _plain_backend(loaded) is not None
    ids = loaded.encode("Hello , world ! Is it 3 . 5 ? It ' s fine n't it .")
    decode = text_decoder(loaded, False)
    assert decode(ids) == as_configured.decode(ids) == loaded.decode(ids)


def test_forced_clean_up_is_kept(tmp_path, default_model_dir):
    path = _tokenizer_dir(tmp_path, default_model_dir, clean_up_tokenization_spaces=True,
                          clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    loaded = load_tokenizer(path)
    _needs_bpe_skip(loaded)
    assert loaded.clean_up_tokenization_spaces is True
    assert _plain_backend(loaded) is None
    ids = loaded.encode("Hello , world !")
    assert text_decoder(loaded, False)(ids) == loaded.decode(ids) == "Hello, world!"
