"""Prompt processing: chat templates, tokenisation and validation, without model weights.

Shared by `LLM` (which owns one) and `batchllm plan` (which needs tokens but no model).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from batchllm.generation_defaults import request_ending_eos_ids
from batchllm.io.openai_batch import refused_template_keywords, text_message, text_parts
from batchllm.models.default_model import default_model_dir, gguf_model_dir
from batchllm.models.spec import (
    RUNS_NO_CODE,
    ModelLoadError,
    ModelSpec,
    read_model_spec,
    rope_type_of,
    weight_files,
)
from batchllm.prefix.radix import as_token_array
from batchllm.structured import GrammarBackend

logger = logging.getLogger(__name__)


class TextPrompt(TypedDict):
    """A prompt as text, as vLLM's `vllm.inputs.TextPrompt` (`LLM.generate` takes plain dicts of this shape)."""

    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    """A prompt as token ids, as vLLM's `vllm.inputs.TokensPrompt` (`prompt`: its text, echoed in the output)."""

    prompt: str


PromptType = str | list[int] | TextPrompt | TokensPrompt
"""One prompt as `LLM.generate` takes it, as vLLM's `vllm.inputs.PromptType` (for scripts' type hints)."""


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """One prompt after tokenisation; `text` is None when it was given as token ids.

    Invariant: `array` holds the same ids as `token_ids`, as a 1-D numpy integer array made once
    (by `validate_ids`, or here from the ids given); the planner and data parallel's shard packing
    use it instead of converting `token_ids` again. `token_ids` stays what callers see (a list from
    `LLM.generate`, so that `RequestOutput.prompt_token_ids` is a list; an int32 array from the CLI)."""

    token_ids: list[int] | np.ndarray
    text: str | None
    array: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.array is None:
            object.__setattr__(self, "array", as_token_array(self.token_ids))


class PromptProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, source: str = "the model",
                 eos_token_ids: list[int] | None = None, max_logprobs: int = -1) -> None:
        self.tokenizer = tokenizer
        self.max_logprobs = max_logprobs
        """The engine's cap on logprobs / prompt_logprobs per request (-1: none), checked per line."""
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.source = source
        self._id_dtype = np.int32 if vocab_size <= np.iinfo(np.int32).max + 1 else np.int64
        """Validated ids lie in [0, vocab_size): int32 holds them whenever the vocabulary fits (half the memory)."""
        if eos_token_ids is None:
            eos_token_ids = [eos] if (eos := getattr(tokenizer, "eos_token_id", None)) is not None else []
        self.eos_token_ids = tuple(eos_token_ids)
        """The ids that end a request (min_tokens bans them: `SamplingParams.check_for_model` takes them)."""
        self.grammars = None if tokenizer is None else GrammarBackend(tokenizer, vocab_size, eos_token_ids)
        """Structured output's `GrammarBackend` (ended by eos_token_ids, None: the tokenizer's EOS; `LLM` gives
        it to its runner too): grammars compile while lines are read, so one that fails is that line's error."""

    def apply_chat_template(
        self, conversation: Any, index: int = 0, add_generation_prompt: bool = True, kwargs: dict | None = None,
        chat_template: str | None = None, content_format: str = "auto",
    ) -> str:
        """The conversation rendered by the tokenizer's chat template, or by `chat_template` (Jinja text)
        where given; `kwargs` (vLLM's chat_template_kwargs) go to the template over `add_generation_prompt`,
        as in vLLM. Message content reaches the template as one string, or as OpenAI's list of text parts where
        `content_format` is "openai" ("auto": where the template loops over a message's content, as vLLM detects
        it on the template rendered: of a tokenizer's named templates, "tool_use" where `kwargs` give tools, else
        "default"). Raises ValueError naming conversation `index` and the problem."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init is set)")
        if chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer of {self.source} has no chat template: give one with --chat-template "
                             "(llm.chat(..., chat_template=...)), or send a plain prompt")
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError(f"conversation {index}: {NOT_A_CONVERSATION}, got {described(conversation)}")
        for j, message in enumerate(conversation):  # (content may be missing: empty text, as vLLM reads it)
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"conversation {index}: message {j} must be an object with a 'role' (and its "
                                 f"'content'), got {described(message)}")
        try:  # (the one transformers renders: a named template's "tool_use" where tools are given, else "default")
            template = self.tokenizer.get_chat_template(chat_template, tools=(kwargs or {}).get("tools"))
        except Exception as e:  # (named templates with no "default", say)
            raise ValueError(f"conversation {index}: {e}") from e
        as_parts = content_format == "openai" or (content_format == "auto" and loops_over_content(template))
        try:  # OpenAI's content parts, as the OpenAI Batch lines take them
            conversation = [(text_parts if as_parts else text_message)(j, message)
                            for j, message in enumerate(conversation)]
        except ValueError as e:
            raise ValueError(f"conversation {index}: {e}") from e
        conversation = developer_as_system(conversation, template)
        if problem := refused_template_keywords(kwargs):
            raise ValueError(f"conversation {index}: chat_template_kwargs {problem}")
        options = {"add_generation_prompt": add_generation_prompt, **(kwargs or {}), "tokenize": False}
        if chat_template is not None:
            options["chat_template"] = chat_template
        if options.get("add_generation_prompt") and options.get("continue_final_message"):
            raise ValueError(f"conversation {index}: add_generation_prompt and continue_final_message cannot "
                             "both be true (continue_final_message needs add_generation_prompt false)")
        try:
            return ChatText(self.tokenizer.apply_chat_template(conversation, **options))
        except Exception as e:  # the template itself rejects the conversation (roles, content types)
            raise ValueError(f"conversation {index}: the chat template failed: {e}") from e

    def tokenize_prompt(self, prompt: Any, index: int = 0, truncate: int | None = None,
                        add_special_tokens: bool | None = None) -> TokenizedPrompt:
        """Validate and tokenize one prompt, keeping its last `truncate` tokens (SamplingParams.truncate_prompt_tokens);
        a text is tokenized with special tokens as `_adds_special_tokens` decides (`add_special_tokens`: vLLM's
        tokenization_kwargs, None where not given); raises ValueError naming prompt `index` and the problem."""
        if isinstance(prompt, dict):
            if given := [k for k in ("prompt_embeds", "multi_modal_data", "mm_processor_kwargs")
                         if prompt.get(k) is not None and not (isinstance(prompt[k], dict) and not prompt[k])]:
                # (an empty dict asks for nothing; vLLM reads embeddings before a text beside them)
                raise ValueError(f"prompt {index}: {given[0]} is not supported: the models here take text and "
                                 "token ids only")
            if "prompt_token_ids" in prompt:
                return self.validate_ids(prompt["prompt_token_ids"], index, prompt.get("prompt"), truncate)
            if "prompt" not in prompt:
                raise ValueError(f"prompt {index}: a dict prompt needs 'prompt' or 'prompt_token_ids'")
            if not isinstance(prompt["prompt"], str):  # (vLLM's "Prompt text should be a string": ids were run)
                raise ValueError(f"prompt {index}: a dict prompt's 'prompt' must be a string, got "
                                 f"{type(prompt['prompt']).__name__} (give token ids as 'prompt_token_ids')")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):  # ("" too: a tokenizer that adds a BOS makes it [BOS], which vLLM runs)
            if self.tokenizer is None:
                raise ValueError(f"prompt {index}: text prompts need a tokenizer (skip_tokenizer_init is set)")
            add_special = self._adds_special_tokens(prompt, add_special_tokens)
            if truncate is None and (too_long := self._opening_over_the_context(prompt, add_special, index)):
                raise too_long
            try:
                ids = self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
            except Exception as e:  # e.g. TypeError on a lone surrogate: this prompt's error, no one else's
                raise ValueError(f"prompt {index}: the tokenizer refused it ({type(e).__name__}: {e})") from e
            specials = self._added_specials(prompt, ids, add_special, truncate)
            return self.validate_ids(ids, index, prompt, truncate, specials)
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return self.validate_ids(prompt if isinstance(prompt, np.ndarray) else list(prompt), index, None, truncate)
        decode = " (decode the bytes to a str first)" if isinstance(prompt, (bytes, bytearray, memoryview)) else ""
        raise ValueError(f"prompt {index}: expected a string, token ids or a dict, got {type(prompt).__name__}{decode}")

    def _adds_special_tokens(self, prompt: str, asked: bool | None = None) -> bool:
        """Whether the tokenizer adds its special tokens (a BOS) to this text: `asked` where given (vLLM's
        tokenization_kwargs add_special_tokens, taken as vLLM takes it, a second BOS included); else not to a
        rendered chat (its template places them: vLLM's chat and transformers' tokenized apply_chat_template add
        none), nor to a text that already opens with the BOS token (vLLM would give it a second one)."""
        if asked is not None:
            return asked
        if isinstance(prompt, ChatText):
            return False
        bos = getattr(self.tokenizer, "bos_token", None)
        return not (bos and prompt.startswith(bos))

    def tokenize_many(self, prompts: list[Any], indices: list[int], truncate: list[int | None] | None = None,
                      add_special: list[bool | None] | None = None) -> list[TokenizedPrompt | ValueError]:
        """Tokenize many prompts with one batched tokenizer call per kind (`truncate`: each one's
        truncate_prompt_tokens; `add_special`: each one's add_special_tokens, None where not asked, as
        `tokenize_prompt` takes them); a bad prompt gives its ValueError in place of a result instead of stopping
        the others."""
        truncate = truncate or [None] * len(prompts)
        add_special = add_special or [None] * len(prompts)
        results: list[TokenizedPrompt | ValueError | None] = [None] * len(prompts)
        texts: dict[bool, list[int]] = {True: [], False: []}  # add_special_tokens -> positions
        for pos, prompt in enumerate(prompts):
            if isinstance(prompt, str) and prompt and self.tokenizer is not None:
                adds = self._adds_special_tokens(prompt, add_special[pos])
                if truncate[pos] is None and (too_long := self._opening_over_the_context(prompt, adds, indices[pos])):
                    results[pos] = too_long
                else:
                    texts[adds].append(pos)
            else:
                results[pos] = _or_error(self.tokenize_prompt, prompt, indices[pos], truncate[pos], add_special[pos])
        for adds, positions in texts.items():
            if not positions:
                continue
            try:
                encoded = self.tokenizer([prompts[p] for p in positions], add_special_tokens=adds)["input_ids"]
            except Exception:  # one prompt the tokenizer refuses fails the batch call: find it one by one
                encoded = [None] * len(positions)
            for pos, ids in zip(positions, encoded):
                results[pos] = (_or_error(self.tokenize_prompt, prompts[pos], indices[pos], truncate[pos],
                                          add_special[pos])
                                if ids is None else
                                _or_error(self.validate_ids, ids, indices[pos], prompts[pos], truncate[pos],
                                          self._added_specials(prompts[pos], ids, adds, truncate[pos])))
        return results  # type: ignore[return-value]

    def _opening_over_the_context(self, text: str, add_special: bool, index: int) -> ContextLengthError | None:
        """The ContextLengthError of a text so long that its opening alone overfills the context, found without
        tokenizing the whole (a 20 MB prompt tokenized whole took 3.5 GB and 20 s before its refusal); None where
        the text is not that long, or its opening holds too few tokens to tell (then the whole is tokenized).

        Invariant: a text is refused here only where its first `OPENING_CHARS_PER_TOKEN * max_model_len`
        characters make at least `OPENING_MARGIN` times the context in tokens; cutting a text changes its tokens
        only around the cut, so the whole has more than the context's tokens, and `validate_ids` would refuse it."""
        opening = OPENING_CHARS_PER_TOKEN * self.max_model_len
        if len(text) <= opening:
            return None
        try:
            count = len(self.tokenizer(text[:opening], add_special_tokens=add_special)["input_ids"])
        except Exception:  # (a lone surrogate, say): the whole text's tokenization names the problem
            return None
        if count < OPENING_MARGIN * self.max_model_len:
            return None
        return ContextLengthError(
            f"prompt {index} has more than {self.max_model_len} tokens (its first {opening} of {len(text)} characters "
            f"alone make {count}); the context (max_model_len) is {self.max_model_len}, which leaves no room to "
            "generate")

    def _added_specials(self, text: str, ids: list[int], add_special: bool, truncate: int | None) -> tuple[int, int]:
        """(before, after): how many of `ids` (`text` tokenized with `add_special`) are special tokens the tokenizer
        put before and after the text's own (a BOS; GLM's two; an EOS some add), which a truncation keeps, as the
        tokenizer's own truncation does. Found, for a prompt that is truncated only, by tokenizing the text again
        without them; (0, 0) where nothing was added or the text's tokens are not found whole among `ids`."""
        if not add_special or truncate is None:
            return 0, 0
        own = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        added = len(ids) - len(own)
        before = next((start for start in range(added + 1) if list(ids[start:start + len(own)]) == list(own)), None)
        return (0, 0) if added <= 0 or before is None else (before, added - before)

    def validate_ids(self, ids: Any, index: int, text: str | None, truncate: int | None = None,
                     specials: tuple[int, int] = (0, 0)) -> TokenizedPrompt:
        """The prompt of these ids (its last `truncate` only, where given; `specials`: how many special tokens the
        tokenizer added before and after the text's own (`_added_specials`), which a truncation keeps, as vLLM's
        tokenizer-side truncation does: HF's left truncation to max_length k gives those and the last k - (before
        + after) text tokens, the BOS alone for k = 1 with a BOS-only tokenizer), with its array
        (`TokenizedPrompt.array`: converted once here, one vectorised range check on it, then kept); raises
        ValueError naming prompt `index` and the problem. `text` stays the prompt as given."""
        # type() not isinstance(): bools are ints to isinstance; map(type) runs at C speed on long prompts
        if not isinstance(ids, (list, tuple)) or not set(map(type, ids)) <= {int}:
            given, ids = ids, _numpy_integers(ids)  # (a tokenizer's return_tensors="np": numpy arrays, integers)
            if ids is None:
                chat = isinstance(given, (list, tuple)) and any(isinstance(m, dict) and "role" in m for m in given)
                raise ValueError(f"prompt {index}: prompt_token_ids must be a list of integers" + (
                    "; this is a conversation: LLM.chat takes conversations, generate and beam_search prompts "
                    "(render one with the tokenizer's apply_chat_template)" if chat else ""))
        if not ids:
            raise ValueError(f"prompt {index} is empty" + (" (its text has no tokens)" if text == "" else ""))
        if truncate is not None:
            keep = self.truncation_length(truncate, index)
            before, after = specials
            if (before or after) and len(ids) > keep:  # as the tokenizer truncates: its special tokens stay
                text_kept = max(keep - before - after, 0)
                text_tokens = ids[before:len(ids) - after]
                ids = [*ids[:before], *text_tokens[len(text_tokens) - text_kept:], *ids[len(ids) - after:]]
            else:
                ids = ids[-keep:]
        try:
            values = np.fromiter(ids, dtype=np.int64, count=len(ids))
            inside = values.view(np.uint64).max() < self.vocab_size  # negatives view as >= 2**63: one pass
        except OverflowError:  # beyond int64: outside any vocabulary
            values, inside = None, False
        if not inside:
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise ValueError(f"prompt {index}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ContextLengthError(
                f"prompt {index} has {len(ids)} tokens; the context (max_model_len) is {self.max_model_len}, "
                "which leaves no room to generate"
            )
        return TokenizedPrompt(list(ids), text, values.astype(self._id_dtype))

    def truncation_for(self, truncate: int | None, max_tokens: int | None) -> int | None:
        """The truncate_prompt_tokens a prompt is cut to, -1 resolved as vLLM resolves it: what the context holds
        beside the request's max_tokens (one token where it gives none, or one the context cannot hold beside any
        prompt: a default such a request stops at the context under); None: no truncation."""
        if truncate != -1:
            return truncate
        reserve = max_tokens if max_tokens is not None and max_tokens < self.max_model_len else 1
        return self.max_model_len - reserve

    def truncation_length(self, truncate: int, index: int) -> int:
        """The tokens a prompt keeps under truncate_prompt_tokens = `truncate` (-1: the context less one; callers
        that know the request's max_tokens resolve it first: `truncation_for`)."""
        if truncate == -1:
            return self.max_model_len - 1
        if truncate > self.max_model_len:  # (as vLLM)
            raise ValueError(f"prompt {index}: truncate_prompt_tokens ({truncate}) is more than the context "
                             f"(max_model_len {self.max_model_len}); give at most that, or -1")
        return truncate


OPENING_CHARS_PER_TOKEN = 16
"""A text longer than this many characters per token of the context is first tokenized by its opening only
(`PromptProcessor._opening_over_the_context`): text averages about 4 characters a token."""
OPENING_MARGIN = 1.25
"""The opening refuses a text only where it makes this many times the context in tokens."""

NOT_A_CONVERSATION = 'a conversation is a non-empty list of message dicts ({"role": ..., "content": ...})'


def messages_problem(messages: Any) -> str | None:
    """Why a line's "messages" (a plain or an OpenAI chat line's) is not a conversation, in `LLM.chat`'s words with
    what was given (and, for one message dict, the hint to wrap it in a list); None where it is a non-empty list."""
    if isinstance(messages, list) and messages:
        return None
    return f"'messages': {not_a_conversation(messages)}"


def not_a_conversation(value: Any) -> str:
    """What a conversation is, what was given instead (`described`) and, for one message dict, the hint to wrap it
    in a list: the words of `LLM.chat`'s and a line's errors."""
    hint = " (one message: wrap it in a list)" if isinstance(value, dict) else ""
    return f"{NOT_A_CONVERSATION}, got {described(value)}{hint}"


def described(value: Any) -> str:
    """A value given where a conversation was expected, in words for an error: its kind and a short repr."""
    from batchllm.sampling_params import short_repr

    if isinstance(value, (list, tuple)) and not value:
        return f"an empty {type(value).__name__}"
    return f"{type(value).__name__} {short_repr(value)}"


class ChatText(str):
    """A conversation rendered by a chat template: tokenized without the tokenizer's special tokens, which the
    template places where it wants them."""

    __slots__ = ()


def _numpy_integers(ids: Any) -> list[int] | None:
    """`ids` as a list of Python ints where it is a 1-D numpy integer array or a list of numpy (and Python)
    integers; else None (bools, floats and anything else are not token ids)."""
    if not isinstance(ids, (list, tuple, np.ndarray)):
        return None
    if not isinstance(ids, np.ndarray) and not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                                   for t in ids):
        return None
    array = np.asarray(ids)
    return array.tolist() if array.ndim == 1 and array.dtype.kind in "iu" else None


class ContextLengthError(ValueError):
    """A prompt (or a prompt and its max_tokens) the model's context cannot hold; `code` is OpenAI's name for it, which
    `batchllm run` gives a failed OpenAI line (`io.jsonl.LineError`)."""

    code = "context_length_exceeded"


def _or_error(call, *args) -> TokenizedPrompt | ValueError:
    """call(*args), or the ValueError it raised (a bad prompt's result)."""
    try:
        return call(*args)
    except ValueError as e:
        return e


def resolve_max_model_len(requested: int | None, spec) -> int:
    """The context the engine runs with: `requested`, or the model's where None. The model's is its config's
    (`spec.context`: the smallest of max_position_embeddings, n_positions, seq_length ... as vLLM derives it), times a
    linear rope scaling's factor (a yarn one's: its original_max_position_embeddings times its factor; as vLLM
    derives them), capped at a sliding
    window: attention here is over the whole context, which equals the model's windowed attention only within
    the window (vLLM's disable_sliding_window=True does the same)."""
    limit, key = spec.context
    why = "" if key == "max_position_embeddings" else f"; its config's {key}"
    if rope_type_of(spec.rope_scaling) == "linear":
        limit = int(limit * float(spec.rope_scaling.get("factor", 1.0)))
        why = f"; {key} {spec.context[0]} x its linear rope factor"
    elif rope_type_of(spec.rope_scaling) == "yarn":
        original = int(spec.rope_scaling["original_max_position_embeddings"])
        limit = int(original * float(spec.rope_scaling.get("factor", 1.0)))
        why = f"; its yarn rope's original_max_position_embeddings {original} x its factor"
    if spec.sliding_window is not None and spec.sliding_window < limit:
        logger.warning("capping the context at the model's sliding window, %d tokens (of %d): attention here has no "
                       "window, the same within it (as vLLM's disable_sliding_window=True)", spec.sliding_window,
                       limit)
        limit = spec.sliding_window
        why = "; its sliding window: attention here has no window, so the context stops at it"
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds what the model supports ({limit}{why})")
    return requested


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
"""A Hugging Face model id: `name` or `org/name` (never a path that starts with /, ., ~ or has two slashes)."""


def local_model_dir(model: str | Path | None, what: str = "model") -> Path:
    """The directory of `model`, never downloading anything: None -> the embedded default model; a GGUF
    file -> the directory it is converted into (`default_model.gguf_model_dir`); an existing path -> itself;
    a Hugging Face model id (`org/name`) that is not a local path -> its snapshot in the local Hugging Face
    cache (HF_HUB_CACHE, HF_HOME), or a ModelLoadError that says it is not there and how to get it. Anything
    else is returned as a path, for `read_model_spec` to name what is wrong with it."""
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":  # converted once into the cache, as the default model is
        if not path.is_file():
            raise ModelLoadError(f"{what} {str(model)!r} names a GGUF file, and there is no such file")
        return gguf_model_dir(path)
    if path.exists() or not _REPO_ID.match(str(model)):
        return path
    from huggingface_hub import snapshot_download  # a transformers dependency
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as e:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ModelLoadError(
            f"{what} {str(model)!r} is neither a local directory nor in the Hugging Face cache ({HF_HUB_CACHE}); "
            f"BatchLLM never downloads at run time: get it first with `hf download {model}` "
            "(or pass the path of a model directory)"
        ) from e


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
"""A directory with none of these holds no tokenizer transformers can load."""


def tokenizer_files_problem(path: Path) -> str | None:
    """Why `path` holds no tokenizer (not a directory, no tokenizer file), or None; checked before a job writes
    anything, and named plainly (transformers calls a missing directory a bad repo id, and no tokenizer file a
    missing sentencepiece)."""
    if not path.is_dir():
        return f"cannot load a tokenizer from {str(path)!r}: no such directory"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return (f"cannot load a tokenizer from {str(path)!r}: it holds none of {', '.join(TOKENIZER_FILES)}; "
                "give the tokenizer's directory with --tokenizer (LLM(tokenizer=...))")
    return tokenizer_code_problem(path)


def _tokenizer_code_message(path: Path, what: str) -> str:
    return (f"cannot load a tokenizer from {str(path)!r}: {what}, code in that directory; {RUNS_NO_CODE}; give a "
            "tokenizer transformers implements itself with --tokenizer (LLM(tokenizer=...))")


def tokenizer_code_problem(path: Path) -> str | None:
    """Why the tokenizer in `path` needs Python code from the directory, or None: its tokenizer_config.json's
    auto_map names an AutoTokenizer class and its tokenizer_class is none transformers has (transformers would
    ask whether to run that code, or refuse it under trust_remote_code=False). Reads that JSON file alone, so it is
    checked before a job writes anything; an unreadable file is left for the load to name."""
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    classes = auto_map if isinstance(auto_map, (list, tuple)) else (
        auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None)
    name = config.get("tokenizer_class")
    if not classes or not isinstance(name, str):
        return None  # no code named, or no class to check here: transformers decides (`load_tokenizer`)
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    base = name.removesuffix("Fast")
    if tokenizer_class_from_name(base) is not None or tokenizer_class_from_name(base + "Fast") is not None:
        return None  # a class transformers has: it loads that, running nothing
    code = ", ".join(str(c) for c in classes if c)
    return _tokenizer_code_message(path, f"its tokenizer_config.json maps AutoTokenizer to {code}")


def load_tokenizer(path: Path):
    """`path`'s tokenizer through transformers' AutoTokenizer with trust_remote_code=False: no code of the
    directory runs and no prompt asks whether to (`tokenizer_code_problem`, and transformers' own refusal named
    as BatchLLM's rule); anything that cannot load is a ModelLoadError naming the directory."""
    from transformers import AutoTokenizer

    if problem := tokenizer_files_problem(path):
        raise ModelLoadError(problem)
    choice = tokenizer_choice_config(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False,
                                                  **({} if choice is None else {"config": choice}))
    except Exception as e:
        if "trust_remote_code" in str(e):  # transformers' refusal of the directory's code under False
            raise ModelLoadError(_tokenizer_code_message(path, "it needs custom code")) from e
        raise ModelLoadError(f"cannot load a tokenizer from {str(path)!r}: {e}") from e
    if _skips_clean_up(tokenizer):
        tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


CONFIG_KEYS_FOR_TOKENIZER_CHOICE = ("model_type", "model_name", "tokenizer_class")
"""What AutoTokenizer reads of a model's config (besides `_name_or_path`) where tokenizer_config.json names a
tokenizer class and maps no code (`tokenizer_choice_config`)."""


def tokenizer_choice_config(path: Path):
    """A plain `PretrainedConfig` that holds what AutoTokenizer reads of the model's config to choose the tokenizer
    class (`CONFIG_KEYS_FOR_TOKENIZER_CHOICE` from config.json, `_name_or_path` the directory, as AutoConfig sets
    it), where tokenizer_config.json names a `tokenizer_class` and has no `auto_map`; else None, and AutoTokenizer
    loads the config itself. Why: AutoTokenizer (transformers 5) loads the model's own config class
    (AutoConfig), whose module imports the modeling utilities and through them `torch.distributed.tensor` and
    sympy: 0.8 s of every process that loads a tokenizer on the development machine, 9.3 s of an engine process
    on the device's image, which compiles them from source (docs/benchmarks.md, sessions 45 and 48). Where a class
    is named and no code mapped, transformers 5.17-5.25 look at the config's class itself only in branches that
    such a directory cannot reach (remote code; no class named); transformers 4 reads no config there at all.
    `tests/unit/test_tokenizer_choice.py` checks that the same class and tokenizer come back."""
    named = _json_object(path / "tokenizer_config.json")
    model = _json_object(path / "config.json")
    if (named is None or model is None or "auto_map" in named or not isinstance(named.get("tokenizer_class"), str)
            or not isinstance(model.get("model_type"), str)):
        return None
    from transformers import PretrainedConfig

    choice = PretrainedConfig()
    for key in CONFIG_KEYS_FOR_TOKENIZER_CHOICE:
        if key in model:
            setattr(choice, key, model[key])
    choice._name_or_path = str(path)
    return choice


def _json_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None where it is missing, unreadable or not an object."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _skips_clean_up(tokenizer) -> bool:
    """Whether `tokenizer` asks for clean-up of tokenization spaces that its `decode` skips anyway:
    transformers 5's fast tokenizers ignore the flag over a BPE model (the clean-up would strip spaces before
    punctuation) unless `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output` forces it,
    and log a warning for it in every process. Setting the flag False there changes no text, stops that
    warning, and lets the per-token decodes call the Rust tokenizer (`output_processor.text_decoder`).
    transformers 4, which does clean up BPE text, has no such attribute: False."""
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None)
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    return (getattr(tokenizer, "clean_up_tokenization_spaces", False) is True and forced is False
            and type(model).__name__ == "BPE")


@dataclass(frozen=True)
class ModelSource:
    """A model directory and what its config.json decides before anything loads: the spec and the
    context the engine runs with. Read once per `LLM` (and once per `batchllm run`:
    `read_model_source`) and handed on: the prompt side (`llm.front_end_for`) and the engine
    (`engine.resolve_model`) take it rather than reading the directory again."""

    model_dir: Path
    spec: ModelSpec
    max_model_len: int
    """The requested context checked against the model's (None asked: the model's own)."""


def read_model_source(model: str | Path | None, max_model_len: int | None = None) -> ModelSource:
    """The ModelSource of a model directory or cached Hugging Face id (None: the default model);
    a missing or unreadable model is a ModelLoadError, a context past the model's a ValueError."""
    model_dir = local_model_dir(model)
    spec = read_model_spec(model_dir)
    return ModelSource(model_dir, spec, resolve_max_model_len(max_model_len, spec))


def check_model_files(source: ModelSource, load_format: str, tokenizer: str | Path | None = None,
                      skip_tokenizer: bool = False) -> None:
    """Raise ModelLoadError where the weights (unless `load_format` is dummy) or the tokenizer (unless
    `skip_tokenizer`: skip_tokenizer_init) are missing, before a job writes anything; loading reads them later."""
    if load_format != "dummy":
        weight_files(source.model_dir)
    if not skip_tokenizer and (problem := tokenizer_files_problem(tokenizer_dir(source, tokenizer))):
        raise ModelLoadError(problem)


def tokenizer_dir(source: ModelSource, tokenizer: str | Path | None) -> Path:
    """The tokenizer's directory: `tokenizer` (a directory or cached id) where given, else the model's."""
    return local_model_dir(tokenizer, "tokenizer") if tokenizer else source.model_dir


def tokenizer_for(source: ModelSource, tokenizer: str | Path | None = None, chat_template: str | None = None):
    """The tokenizer of `source`'s model, or of `tokenizer` (a directory or cached id) where given, with
    `chat_template` (`read_chat_template`) in place of its own where given."""
    loaded = load_tokenizer(tokenizer_dir(source, tokenizer))
    if chat_template is not None:
        loaded.chat_template = read_chat_template(chat_template)
    return loaded


@functools.lru_cache(maxsize=32)
def loops_over_content(template: str | None) -> bool:
    """Whether a chat template iterates over a message's content, so expects OpenAI's list of parts (a string
    would be iterated by character and the text lost): vLLM's content format "auto", decided as vLLM decides
    it on the syntax tree of the template as transformers compiles it. A loop counts where it runs over
    `M.content` or `M['content']` (under filters, tests and slices), M the target of a loop over `messages`
    or over a name bound to it through any chain of `{% set %}` (`set a = messages`, `set b = a | list`), or
    over a name `content` itself (a macro's parameter, as Qwen3.5 passes it). Names are matched without
    scopes, as vLLM matches them; nothing else is followed (`set c = m.content`, a macro's other parameters,
    `ns.messages`). Where vLLM cannot read the template (None, it does not compile, or a name in that chain is
    bound by a non-name target: `set ns.m = messages`, `for a, b in messages`) it is a string template,
    vLLM's default; so is one whose first content loop has such a target."""
    tree = _parsed_template(template) if isinstance(template, str) else None
    if tree is None:
        return False
    try:
        messages = _bound_names(tree, {"messages"})
        return _first_content_loop(tree, messages) is not None
    except _UnreadTemplate:
        return False


class _UnreadTemplate(Exception):
    """A template shape vLLM's content-format detection fails on (it then takes vLLM's default, a string)."""


def _bound_names(tree, names: set[str]) -> set[str]:
    """The targets of the loops over `names` or any alias of them: the names bound to `names` through chains of
    `{% set x = ... %}` (followed to a fixed point, so cycles end) under filters, tests and slices. Raises
    _UnreadTemplate where such an assignment or loop binds something other than one name."""
    from jinja2 import nodes

    aliases, grown = set(names), True
    while grown:
        grown = False
        for assign in tree.find_all(nodes.Assign):
            if _is_name(assign.node, aliases):
                target = _target_name(assign.target)
                grown, aliases = grown or target not in aliases, aliases | {target}
    return {_target_name(loop.target) for loop in tree.find_all(nodes.For) if _is_name(loop.iter, aliases)}


def _first_content_loop(tree, messages: set[str]):
    """The first loop (in the template's order) over a message's content: `M.content` / `M['content']`, M one of
    `messages`, under filters, tests and slices; or the bare name `content` (not under a filter, as vLLM
    matches it). None where there is none; raises _UnreadTemplate where that loop's target is not one name."""
    from jinja2 import nodes

    for loop in tree.find_all(nodes.For):
        node = _unwrapped(loop.iter)
        key = node.attr if isinstance(node, nodes.Getattr) else node.arg.value if isinstance(
            node, nodes.Getitem) and isinstance(node.arg, nodes.Const) else None
        on_message = key == "content" and isinstance(node.node, nodes.Name) and node.node.name in messages
        if on_message or (isinstance(loop.iter, nodes.Name) and loop.iter.name == "content"):
            _target_name(loop.target)
            return loop
    return None


def _target_name(target) -> str:
    """The name a `{% set %}` or `{% for %}` binds; _UnreadTemplate where it binds a tuple or a namespace's
    attribute (`set ns.x = ...`)."""
    from jinja2 import nodes

    if not isinstance(target, nodes.Name):
        raise _UnreadTemplate(f"binds {type(target).__name__}")
    return target.name


def _parsed_template(template: str):
    """The Jinja syntax tree of a chat template, parsed as transformers compiles it (its own tags, such as
    `{% generation %}`, included), or None where it does not parse."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template).environment.parse(template)
    except Exception:  # noqa: BLE001 - a private helper, or a template that does not compile: a string template
        return None


def _unwrapped(node):
    """The expression under filters, tests and slices (`messages | reverse`, `message['content'][1:]`)."""
    from jinja2 import nodes

    while isinstance(node, (nodes.Filter, nodes.Test)) or (
            isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)):
        node = node.node
    return node


def _is_name(node, names: set[str]) -> bool:
    from jinja2 import nodes

    node = _unwrapped(node)
    return isinstance(node, nodes.Name) and node.name in names


def read_chat_template(value: str) -> str:
    """A chat template given as a file's path or inline, as vLLM's --chat-template takes it: an existing
    file is read; else the text is the template. Either must be Jinja that renders `messages`: anything
    else (a mistyped path, say) is a ValueError naming it."""
    path = Path(value).expanduser() if "\n" not in value and len(value) < 4096 else None
    text = value
    try:
        is_file = path is not None and path.is_file()
    except OSError:  # a one-line template longer than a file name may be ("File name too long"): the text
        is_file = False
    if is_file:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the chat template {value!r}: {e}") from e
    a_path = is_file or (path is not None and "{" not in value and len(value) <= 1024)  # named whole: its file name
    shown = value if len(value) <= 80 or a_path else value[:77] + "..."  # ends it; an inline template is cut
    if not ("{{" in text or "{%" in text) or "messages" not in text:
        raise ValueError(f"chat_template {shown!r} is neither a file nor a Jinja template that renders `messages`")
    if problem := _template_syntax_error(text):
        raise ValueError(f"chat_template {shown!r} is not valid Jinja: {problem}")
    return text


def _template_syntax_error(text: str) -> str | None:
    """Where a chat template's Jinja does not parse, as transformers compiles it (its own tags included), or None.
    Checked once at start: each line's rendering would fail with it, after the model had loaded."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # (a private helper: without it, each line's rendering names the error)
        return None
    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as e:
        return f"line {e.lineno}: {e.message}"
    except Exception:  # noqa: BLE001 - anything else is for the rendering to say
        return None
    return None


def prompt_processor_for(model: str | None, tokenizer: str | None = None, max_model_len: int | None = None,
                         max_logprobs: int = -1, chat_template: str | None = None,
                         generation_config: str = "auto") -> PromptProcessor:
    """A PromptProcessor for a model directory or cached Hugging Face id (None: the default model)
    without loading weights; `max_logprobs`, `chat_template` and `generation_config` as `LLM`'s (-1: no cap). Its
    EOS ids are the engine's (`request_ending_eos_ids`), so its checks refuse what the engine's would."""
    source = read_model_source(model, max_model_len)
    loaded = tokenizer_for(source, tokenizer, chat_template)
    eos_token_ids = request_ending_eos_ids(source.model_dir, generation_config, source.spec.config_eos_token_ids,
                                           loaded)
    return PromptProcessor(loaded, source.spec.vocab_size, source.max_model_len, str(source.model_dir),
                           sorted(eos_token_ids), max_logprobs)


def developer_as_system(conversation: list[dict], template: str) -> list[dict]:
    """OpenAI's "developer" messages where the chat template names no such role, as vLLM 0.26 renders them
    (`renderers/hf.py`): each becomes a "system" message (its tools dropped), and then, where a system message is
    not alone at the front, every system message's text is merged into one at the front, joined by a blank line
    (a list of parts joined by newlines; empty ones left out), the other messages in their order. A template that
    names "developer" (quoted) gets the conversation as it is. SmolLM2's template rendered a "developer" turn,
    and templates that refuse unknown roles failed the line vLLM serves."""
    if not any(m.get("role") == "developer" for m in conversation) or any(
            f"{q}developer{q}" in template for q in "\"'"):
        return conversation
    converted = [{k: v for k, v in m.items() if k != "tools"} | {"role": "system"} if m.get("role") == "developer"
                 else m for m in conversation]
    systems = [i for i, m in enumerate(converted) if m["role"] == "system"]
    if systems == [0] or not systems:
        return converted
    texts = []
    for i in systems:
        content = converted[i].get("content") or ""
        if isinstance(content, list):  # (`text_parts`' parts: each {"type": "text", "text": ...})
            content = "\n".join(part["text"] for part in content)
        if content:
            texts.append(content)
    return [{"role": "system", "content": "\n\n".join(texts)}] + [m for m in converted if m["role"] != "system"]
