"""vLLM's reasoning parsers, for chat answers (`batchllm run --reasoning-parser NAME`): the thinking a
reasoning model writes between `<think>` and `</think>` goes to the message's `reasoning`, the rest to its
`content`, as vLLM 0.26's server splits a finished answer. Only the split of a whole answer is needed here
(no streaming), so each parser is a function of the answer's text. Imports nothing from the package."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START = "<tool_call>"


def _deepseek_r1(text: str, template_kwargs: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """DeepSeek-R1 (vLLM's BaseThinkingReasoningParser): the answer's first `<think>` is dropped; what comes
    before the first `</think>` is reasoning (all of it where none follows, as a model whose template opened the
    thinking writes no `<think>`), the rest content, None where empty."""
    before, start, after = text.partition(THINK_START)
    text = after if start else before
    reasoning, end, content = text.partition(THINK_END)
    return (reasoning, None) if not end else (reasoning, content or None)


def _qwen3(text: str, template_kwargs: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """Qwen3 (vLLM 0.26's Qwen3Parser): with the template's `enable_thinking` false the whole answer is content;
    else the answer opens in its reasoning, where `<think>` is dropped, up to the first `</think>` or a
    `<tool_call>` (which starts the content); in the content a `</think>` is dropped. Each part is None where
    empty."""
    if not (template_kwargs or {}).get("enable_thinking", True):
        return None, text
    ends = [at for at in (text.find(THINK_END), text.find(TOOL_CALL_START)) if at != -1]
    if not ends:
        return text.replace(THINK_START, "") or None, None
    end = min(ends)
    reasoning = text[:end].replace(THINK_START, "")
    content = text[end + len(THINK_END):] if text.startswith(THINK_END, end) else text[end:]
    return reasoning or None, content.replace(THINK_END, "") or None


REASONING_PARSERS: dict[str, Callable[[str, dict[str, Any] | None], tuple[str | None, str | None]]] = {
    "deepseek_r1": _deepseek_r1, "qwen3": _qwen3}
"""vLLM's --reasoning-parser names taken here -> (answer text, the line's chat template keywords) ->
(reasoning, content)."""


SKIPS_NO_SPECIAL_TOKENS = ("qwen3",)
"""Parsers whose adjust_request sets every chat request's skip_special_tokens false: vLLM 0.26's qwen3 is a parser
engine adapter (ParserEngine.adjust_request), which its server calls on each chat request wherever a reasoning
parser is set (tool_choice and tools aside); deepseek_r1's adjust_request changes nothing."""


NEEDS_THINK_TOKENS = ("deepseek_r1",)
"""Parsers that refuse a tokenizer without `<think>` and `</think>` tokens, as vLLM 0.26's BaseThinkingReasoningParser
does (deepseek_r1); its qwen3 (a parser engine) looks the tokens up without requiring them and splits the text, so a
model that writes `<think>` in several tokens is served."""


def check_tokenizer(name: str | None, vocab: dict[str, int]) -> None:
    """ValueError where parser `name` needs tokens the tokenizer's `vocab` lacks (`NEEDS_THINK_TOKENS`): its
    `<think>` and `</think>`, as vLLM's refuses to start without them (every answer would be taken for thinking)."""
    if name in NEEDS_THINK_TOKENS and (missing := [t for t in (THINK_START, THINK_END) if t not in vocab]):
        raise ValueError(f"--reasoning-parser {name}: the tokenizer has no {' or '.join(missing)} token (as "
                         "vLLM, the parser needs both); this model does not think in <think> blocks")


def reasoning_parser_named(name: str | None):
    """The parser of that name (None: none); ValueError naming the ones taken for another."""
    if name is None or name == "":
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"--reasoning-parser {name!r} is not supported (supported: "
                         f"{', '.join(sorted(REASONING_PARSERS))}: <think>...</think>)")
    return REASONING_PARSERS[name]
