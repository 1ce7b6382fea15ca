"""vLLM's reasoning parsers, for chat answers (`batchllm run --reasoning-parser NAME`): the thinking a
reasoning model writes between `<think>` and `</think>` goes to the message's `reasoning`, the rest to its
`content`, as vLLM 0.26's server splits a finished answer. Only the split of a whole answer is needed here
(no streaming), so each parser is a function of the answer's text. Imports nothing from the package."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"


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
    else the answer opens in its reasoning, where `<think>` is dropped, up to the first `</think>`; after it,
    another `</think>` is dropped. Each part is None where empty."""
    if not (template_kwargs or {}).get("enable_thinking", True):
        return None, text
    reasoning, end, content = text.partition(THINK_END)
    reasoning = reasoning.replace(THINK_START, "")
    content = content.replace(THINK_END, "") if end else ""
    return reasoning or None, content or None


REASONING_PARSERS: dict[str, Callable[[str, dict[str, Any] | None], tuple[str | None, str | None]]] = {
    "deepseek_r1": _deepseek_r1, "qwen3": _qwen3}
"""vLLM's --reasoning-parser names taken here -> (answer text, the line's chat template keywords) ->
(reasoning, content)."""


def reasoning_parser_named(name: str | None):
    """The parser of that name (None: none); ValueError naming the ones taken for another."""
    if name is None or name == "":
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"--reasoning-parser {name!r} is not supported (supported: "
                         f"{', '.join(sorted(REASONING_PARSERS))}: <think>...</think>)")
    return REASONING_PARSERS[name]
