"""The plain tokenizer config against AutoTokenizer loading the config itself, 6 class names x 5 model types, in a
venv with only transformers (and its dependencies) at a given version: session 48 ran it with 4.57.1 and 5.17.0
(the device image's); "different: 0" on both. The config is built as `inputs.tokenizer_choice_config` builds it."""

import json
import logging
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PretrainedConfig

logging.disable(logging.WARNING)
SRC = Path("/root/.cache/batchllm/SmolLM2-135M-Instruct")
CLASSES = ["GPT2Tokenizer", "GPT2TokenizerFast", "PreTrainedTokenizerFast", "LlamaTokenizerFast", "Qwen2Tokenizer",
           "Qwen2TokenizerFast"]
TYPES = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]
TEXT = "héllo <|im_end|> x"


def light(path):
    model = json.loads((path / "config.json").read_text())
    config = PretrainedConfig()
    for key in ("model_type", "model_name", "tokenizer_class"):
        if key in model:
            setattr(config, key, model[key])
    config._name_or_path = str(path)
    return config


def model_dir(tokenizer_class, model_type):
    path = Path(tempfile.mkdtemp()) / "m"
    path.mkdir()
    for f in SRC.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special")):
            shutil.copy(f, path / f.name)
    named = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**named, "tokenizer_class": tokenizer_class}))
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 49152}))
    return path


def load(path, **kwargs):
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - both ways must fail alike
        return e


def same(a, b):
    if type(a) is not type(b):
        return False
    return isinstance(a, Exception) or (a.get_vocab() == b.get_vocab() and a(TEXT).input_ids == b(TEXT).input_ids
                                        and a.chat_template == b.chat_template)


different = 0
for tokenizer_class in CLASSES:
    for model_type in TYPES:
        path = model_dir(tokenizer_class, model_type)
        a, b = load(path, config=light(path)), load(path)
        different += not same(a, b)
        print(tokenizer_class, model_type, type(a).__name__, type(b).__name__, "same" if same(a, b) else "DIFFERENT")
print("different:", different)
