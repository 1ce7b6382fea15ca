"""The OpenAI Batch file format: request lines in, response lines out.

Input line: {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}.
Body fields are mapped onto SamplingParams (penalties, logit_bias and response_format included, as
OpenAI defines them); a field the engine cannot honour (tools, streaming, ...) makes that line an
error naming the field, never silently dropped.
Output line: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}
with a chat.completion or text_completion body (with usage); a line that failed gets OpenAI's refusal,
"response": {"status_code": 400, "request_id", "body": {"error": {"message", "type", "param", "code"}}},
and "error": {"code", "message"} (`error_record`).
"""

from __future__ import annotations

import codecs
import json
import math
import re
import time
import uuid
from typing import Any, NamedTuple

from batchllm.io.tool_calls import (
    AutoToolChoice,
    ForcedToolCall,
    finish_reason_of,
    forced_tool_call,
    message_calls,
    tool_constraint,
)
from batchllm.sampling_params import in_field_terms

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"

# body field -> SamplingParams field, per endpoint
_COMMON = {"temperature": "temperature", "top_p": "top_p", "n": "n", "stop": "stop", "seed": "seed",
           # vLLM's extra sampling parameters, accepted in the body as vLLM's server does
           "top_k": "top_k", "min_p": "min_p", "min_tokens": "min_tokens", "ignore_eos": "ignore_eos",
           "stop_token_ids": "stop_token_ids", "include_stop_str_in_output": "include_stop_str_in_output",
           "skip_special_tokens": "skip_special_tokens",
           "spaces_between_special_tokens": "spaces_between_special_tokens",
           "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
           "repetition_penalty": "repetition_penalty", "allowed_token_ids": "allowed_token_ids",
           "bad_words": "bad_words", "structured_outputs": "structured_outputs",
           "truncate_prompt_tokens": "truncate_prompt_tokens", "prompt_logprobs": "prompt_logprobs"}
# Fields accepted when they ask for what the engine does anyway; any other value is an error.
_ONLY_DEFAULT = {"stream": (False, None), "best_of": (1, None), "suffix": (None, ""),
                 "parallel_tool_calls": (None, True, False),
                 "stream_options": (None, {}), "modalities": (None, ["text"]),  # ({}: vLLM refuses a truthy one)
                 # vLLM's own request fields, as its request models write them (model_dump)
                 "use_beam_search": (False, None), "priority": (0, None),
                 "truncation_side": (None, "left"),  # ("right" beside no truncate_prompt_tokens: `_check_fields`)
                 "thinking_token_budget": (None, -1),  # (-1: vLLM's "no budget")
                 # (vLLM 0.26's /render endpoints' alone: its generation endpoints ignore them, either value)
                 "return_token_offsets": (False, True, None)}
_ONLY_DEFAULT_CHAT = {"mm_processor_kwargs": (None, {}),
                      "media_io_kwargs": (None, {}), "return_assistant_tokens_mask": (False, True, None),
                      "return_prompt_text": (False, None)}
# (include_reasoning is no field of vLLM's completions request: an extra one, which its request model ignores)
_ONLY_DEFAULT_COMPLETIONS = {"tool_choice": (None, "none"),
                             "include_reasoning": (True, False, None)}
# bookkeeping, echoed or irrelevant offline (prompt_cache_key, safety_identifier: OpenAI's successors of user;
# verbosity: a hint to OpenAI's own models; cache_salt: vLLM's, which keeps a prefix cache's entries apart;
# prediction: OpenAI's predicted output, which changes latency, never the answer; length_penalty: vLLM's, read by
# beam search alone, which a body cannot ask here; kv_transfer_params, ec_transfer_params, vllm_xargs: vLLM's
# extra_args for KV connectors and plugins, of which a run without them reads nothing)
_IGNORED = {"model", "user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
            "safety_identifier", "verbosity", "cache_salt", "prediction", "length_penalty", "kv_transfer_params",
            "ec_transfer_params", "vllm_xargs"}


class BodyError(ValueError):
    pass


ECHO_PROMPT, ECHO_BOTH = "prompt", "prompt and output"
"""A completions line's `echo`: the prompt alone (max_tokens 0), or the prompt before the output."""


class BodyRequest(NamedTuple):
    """What an OpenAI request body asks for."""

    url: str
    prompt: Any
    is_chat: bool
    overrides: dict[str, Any]
    """SamplingParams fields."""
    template: dict[str, Any] | None
    """A chat's extra chat-template keywords."""
    echo: str | None = None
    """ECHO_PROMPT or ECHO_BOTH where a completions body asks `echo` (its text, tokens and logprobs start with the
    prompt's, as vLLM's); None otherwise."""
    asks: ResponseAsks | None = None
    """What the body asks of its response beside the answer (`response_asks`); None: nothing."""
    tool_call: ForcedToolCall | AutoToolChoice | None = None
    """A chat body's forced tool call (tool_choice "required" or a named function: `tool_calls`), whose answer is
    constrained (`overrides`' structured_outputs) and read back as the message's tool calls; or its "auto" (or null
    beside tools) choice, whose text answer a tool-call parser reads where the job serves it
    (`tool_calls.served_tool_choice`)."""
    add_special_tokens: bool | None = None
    """The body's add_special_tokens where it differs from its endpoint's default (a completion's true, a chat's
    false): whether its text (a completion's prompt, a chat's rendered messages) is tokenized with the tokenizer's
    special tokens, as vLLM's server takes it; None where not given or at the default, which tokenizes as a line
    without it (`PromptProcessor._adds_special_tokens`: no second BOS before a text that opens with one)."""


def template_kwargs(value: Any) -> dict[str, Any] | None:
    """vLLM's `chat_template_kwargs` of a chat line (e.g. {"enable_thinking": false} for Qwen3): None or
    an object, passed to the model's chat template."""
    if value is not None and not isinstance(value, dict):
        raise BodyError("'chat_template_kwargs' must be an object (e.g. {\"enable_thinking\": false})")
    return value or None


def refused_template_keywords(kwargs: dict | None) -> str | None:
    """Why template keywords (a line's or the job's) are refused, or None: a `chat_template` of a line's own, as
    vLLM 0.26's server refuses it without --trust-request-chat-template (not taken here: a file's lines do not
    bring their own Jinja). `LLM.chat` takes one (`LLM._chat_prompts`), as vLLM's; a `tokenize` key is overridden
    (the text is tokenized here), as vLLM overrides it."""
    if (kwargs or {}).get("chat_template") is not None:
        return ("must not hold chat_template (vLLM's server refuses a request's own template without "
                "--trust-request-chat-template, not taken here): give the job's with --chat-template")
    return None


def with_template_defaults(defaults: dict[str, Any] | None, kwargs: dict[str, Any] | None,
                           openai: bool = False) -> dict[str, Any] | None:
    """A chat line's template keywords over the job's defaults (vLLM's --default-chat-template-kwargs): a
    line's own value wins, except None and "auto", which leave the default, as vLLM merges them; an `openai`
    line's body decides BODY_DECIDES whatever the defaults say."""
    if openai and defaults and any(k in defaults for k in BODY_DECIDES):  # (else one dict for every line)
        defaults = {k: v for k, v in defaults.items() if k not in BODY_DECIDES}
    if not defaults:
        return kwargs
    own = {k: v for k, v in (kwargs or {}).items() if v is not None and not (isinstance(v, str) and v == "auto")}
    return {**defaults, **own} if own else defaults  # (one dict for the lines without their own: never mutated)


def body_to_request(url: str, body: Any) -> BodyRequest:
    """Validate an OpenAI request body (BodyError naming the field)."""
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise BodyError(f"unsupported url {url!r} (supported: {CHAT_URL}, {COMPLETIONS_URL})" if url is not None
                        else f"the line lacks 'url' ({CHAT_URL} or {COMPLETIONS_URL})")
    if not isinstance(body, dict):
        raise BodyError("'body' must be a JSON object")
    chat = url == CHAT_URL
    prompt_field = "messages" if chat else "prompt"
    if prompt_field not in body:
        raise BodyError(f"body lacks '{prompt_field}'")
    body = values_from_text(body, chat)
    _check_fields(body, chat, prompt_field)
    _check_seed(body.get("seed"))
    overrides = {_COMMON[k]: body[k] for k in _COMMON if k in body and body[k] is not None}
    if body.get("logit_bias") is not None:
        overrides["logit_bias"] = _logit_bias(body["logit_bias"])
    structured = _response_format(body.get("response_format"))
    if structured is not None:  # over the body's structured_outputs, whose other fields stay (vLLM's merge)
        overrides["structured_outputs"] = _merged_structured_outputs(overrides.get("structured_outputs"), structured)
    prompt, max_tokens = (_chat_prompt if chat else _completions_prompt)(body, overrides)
    template, tools = _chat_template_options(body) if chat else (None, None)
    forced = _forced_tool_call(body, tools, overrides) if chat else None
    _named_logprobs(body, chat, overrides)
    echo = _echo(body, chat, prompt, max_tokens, overrides)
    if echo == ECHO_PROMPT:
        max_tokens = 1  # (vLLM's: one token is generated, and the prompt alone answered)
    if max_tokens is not None:
        overrides["max_tokens"] = max_tokens
    special = None if body.get("add_special_tokens") is None else _flag(body["add_special_tokens"],
                                                                           "add_special_tokens")
    return BodyRequest(url, prompt, chat, overrides, template, echo, response_asks(body, prompt if chat else None),
                       forced, None if special == (not chat) else special)


def _merged_structured_outputs(own: Any, from_format: dict) -> dict:
    """A body's structured_outputs with its response_format's constraint over it, as vLLM 0.26's server merges them
    (`structured_outputs_from_response_format`: the same kind is replaced, its other fields, disable_any_whitespace
    say, stay; two kinds fail as one structured_outputs of two kinds fails). Both in one body failed the line."""
    if own is None:
        return from_format
    if not isinstance(own, dict):  # (a StructuredOutputsParams object cannot come from JSON)
        raise BodyError(f"'structured_outputs' must be an object, got {json.dumps(own)[:40]}")
    return {**own, **from_format}


def _forced_tool_call(body: dict, tools: list | None, overrides: dict
                      ) -> ForcedToolCall | AutoToolChoice | None:
    """A chat body's forced tool call (`tool_calls.forced_tool_call`; tools: the body's, as a template gets them), its
    constraint put in `overrides` (`tool_calls.tool_constraint`: over a response_format's, as vLLM's server puts
    it; the body's own structured_outputs checked first, as without tools); its "auto" choice (`AutoToolChoice`,
    unconstrained: a body's own structured_outputs or response_format stays, as in vLLM); None where the answer is
    text. An absent tool_choice is "auto" where there are tools and a null one is null (a text answer, unless the
    job serves "auto": `AutoToolChoice.null_choice`), as vLLM's request model defaults only a missing key. A
    tool_choice that cannot be served is a BodyError naming it."""
    choice = body["tool_choice"] if "tool_choice" in body else "auto" if tools else None
    try:
        forced = forced_tool_call(tools, choice, body.get("parallel_tool_calls"))
        if isinstance(forced, ForcedToolCall):
            overrides["structured_outputs"], forced = tool_constraint(forced, tools, body.get("structured_outputs"))
        elif choice is None and tools:  # (a text answer, unless the job serves "auto": vLLM's parser reads it)
            forced = AutoToolChoice(body.get("parallel_tool_calls") is not False, null_choice=True)
    except ValueError as e:  # (a ToolChoiceError, or the body's own structured_outputs: named as the body names it)
        raise BodyError(in_field_terms(e)) from None
    return forced


def response_asks(body: dict, messages: list | None = None) -> ResponseAsks | None:
    """A body's vLLM fields that shape its response: `request_id` (a string), `return_token_ids`,
    `return_tokens_as_token_ids`, and a chat's `echo` (`messages`: the chat's, checked)."""
    request_id = body.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise BodyError(f"'request_id' must be a string, got {json.dumps(request_id)[:40]}")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):  # (vLLM's check; it changes nothing here)
        raise BodyError("'cache_salt' must be a non-empty string if given")
    return_ids = _flag(body.get("return_token_ids"), "return_token_ids")
    echoed = None
    if messages is not None and _flag(body.get("echo"), "echo"):
        last = text_message(len(messages) - 1, messages[-1])
        echoed = (last.get("role"), last.get("content") or "")
    include_reasoning = body.get("include_reasoning") is None or _flag(body["include_reasoning"], "include_reasoning")
    as_ids = body.get("return_tokens_as_token_ids")
    as_ids = None if as_ids is None else _flag(as_ids, "return_tokens_as_token_ids")
    asks = ResponseAsks(request_id, return_ids, echoed, include_reasoning if messages is not None else True, as_ids)
    return asks if asks != ResponseAsks() else None


_INTEGER_BODY_FIELDS = ("n", "seed", "top_k", "min_tokens", "truncate_prompt_tokens", "prompt_logprobs", "max_tokens",
                        "max_completion_tokens", "top_logprobs", "priority")
_TOKEN_ID_LIST_FIELDS = ("stop_token_ids", "allowed_token_ids", "logprob_token_ids")
_FLOAT_BODY_FIELDS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                      "length_penalty")
_INTEGER_TEXT = re.compile(r"[+-]?\d+(_\d+)*(\.0*)?")


_BOOLEAN_BODY_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                        "spaces_between_special_tokens", "stream", "use_beam_search", "include_reasoning",
                        "parallel_tool_calls", "add_special_tokens")
"""Boolean fields read through `_FLAG_WORDS` before their checks (`echo`, `return_token_ids`, a chat body's
`logprobs` and the chat-template flags are read by `_flag` where they are used)."""


def values_from_text(body: dict, chat: bool) -> dict:
    """`body` with its numeric fields written as text read as numbers ("0.7", "256", " 4 ", "4.0" for an integer) and
    its boolean fields written as text as booleans ("false", "True", "0": `_FLAG_WORDS`), as vLLM's server (pydantic,
    lax) reads a request; other text is left for the checks to refuse by name. A completions body's `logprobs` is an
    integer (a chat body's, a flag, is left as given)."""
    integers = _INTEGER_BODY_FIELDS if chat else (*_INTEGER_BODY_FIELDS, "logprobs")
    read = {}
    for name in _BOOLEAN_BODY_FIELDS:
        if (flag := _lax_flag(body.get(name))) is not None:
            read[name] = flag
    for name in _TOKEN_ID_LIST_FIELDS:  # ["2"]: a list of ids written as text, which pydantic reads as integers
        ids = body.get(name)
        if isinstance(ids, list) and any(type(t) in (str, float) for t in ids) and all(
                type(t) is int or type(t) is float and t.is_integer()
                or type(t) is str and _integer_of_text(t) is not None for t in ids):
            read[name] = [_integer_of_text(t) if type(t) is str else int(t) for t in ids]
    for name in (*integers, *_FLOAT_BODY_FIELDS):
        if not isinstance(text := body.get(name), str):
            continue
        if name in integers and (number := _integer_of_text(text)) is not None:
            read[name] = number
        elif name in _FLOAT_BODY_FIELDS:
            try:
                read[name] = float(text)
            except ValueError:
                pass
    return {**body, **read} if read else body


def _integer_of_text(text: str) -> int | None:
    """The integer vLLM's server reads from text (" 4 ", "4.0", "1_000"), or None where it reads none."""
    return int(text.strip().split(".")[0]) if _INTEGER_TEXT.fullmatch(text.strip()) else None


def _check_fields(body: dict, chat: bool, prompt_field: str) -> None:
    """Every field of the body is one taken here (null: not set, as writers say it), at a value it can honour."""
    known = set(_COMMON) | set(_ONLY_DEFAULT) | _IGNORED | {prompt_field, "max_tokens", "logprobs", "logit_bias",
                                                             "response_format", "echo", "logprob_token_ids",
                                                             "request_id", "return_token_ids",
                                                             "return_tokens_as_token_ids", "add_special_tokens"}
    only_default = {**_ONLY_DEFAULT, **(_ONLY_DEFAULT_CHAT if chat else _ONLY_DEFAULT_COMPLETIONS)}
    known |= set(only_default)
    known |= {"max_completion_tokens", "top_logprobs", "tools", "tool_choice", "documents", "include_reasoning",
              *CHAT_TEMPLATE_FIELDS} if chat else set()
    unknown = sorted(name for name in set(body) - known if body[name] is not None)
    if unknown:
        guided = next((name for name in unknown if name.startswith("guided_")), None)
        hint = "" if guided is None else (
            f" ({guided} is vLLM's before 0.12: remove it; structured output runs on xgrammar)"
            if guided == "guided_decoding_backend" else
            f" ({guided} is vLLM's name before 0.12: give structured_outputs or response_format)")
        raise BodyError(f"body field(s) not supported: {', '.join(unknown)}{hint}")
    _check_unread_types(body)
    for name, allowed in only_default.items():
        if name == "truncation_side" and body.get("truncate_prompt_tokens") is None and body.get(name) == "right":
            continue  # (vLLM reads the side only where it truncates)
        if name in body and body[name] not in allowed:
            taken = " or ".join(json.dumps(v) for v in allowed if v is not None) or "null"
            taken += ', or "right" beside no truncate_prompt_tokens' if name == "truncation_side" else ""
            raise BodyError(f"body field {name!r} = {json.dumps(body[name])[:80]} is not supported (only {taken})")


_NUMBER = (int, float)  # (pydantic's lax float: true and false too, as 1.0 and 0.0)
_UNREAD_TYPES = {"length_penalty": (_NUMBER, "a number"), "vllm_xargs": (dict, "an object"),
                 "kv_transfer_params": (dict, "an object"), "ec_transfer_params": (dict, "an object"),
                 "thinking_token_budget": (int, "an integer")}
"""Fields a body's answer never reads here (`_IGNORED`, or taken at a value that reads nothing) whose type vLLM's
request models still check."""


def _check_unread_types(body: dict) -> None:
    """An unread field (`_UNREAD_TYPES`) of another type than vLLM's request models take is refused, as vLLM refuses
    it: ignoring the value does not make it valid."""
    for name, (types, what) in _UNREAD_TYPES.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and types is not _NUMBER):
            raise BodyError(f"'{name}' must be {what}, got {json.dumps(value)[:40]}")


def _check_seed(seed: Any) -> None:
    """A body's seed lies in a signed 64-bit integer, as vLLM's request models bound it (`Field(ge=-2**63,
    le=2**63-1)`; SamplingParams itself takes up to 2**64 - n, which LLM calls keep)."""
    if isinstance(seed, (int, float)) and not isinstance(seed, bool) and not -2**63 <= seed < 2**63:
        raise BodyError(f"'seed' must lie in a signed 64-bit integer [-2**63, 2**63 - 1], got {seed}")


def _chat_prompt(body: dict, overrides: dict) -> tuple[list, Any]:
    """A chat body's messages (checked here, rendered as the chat template takes them later: `text_message` or
    `text_parts`) and max_tokens; its logprobs into `overrides`."""
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        from batchllm.inputs import messages_problem  # (LLM.chat's words; inputs is heavy to import)

        raise BodyError(messages_problem(messages))
    messages = [_reasoning_renamed(message) for message in messages]
    for j, message in enumerate(messages):
        text_message(j, message)
    # max_completion_tokens is OpenAI's newer name; given both (JSON writers emit null for the one not
    # set), it wins, as in vLLM's server
    completion = body.get("max_completion_tokens")
    if type(completion) is float and completion.is_integer():
        completion = int(completion)  # 4.0 -> 4, as for max_tokens (`integers_from_json`)
    if completion is not None and (not isinstance(completion, int) or isinstance(completion, bool)
                                   or completion < 1):  # (named as given: later checks say max_tokens)
        raise BodyError(f"'max_completion_tokens' must be a positive integer, got {json.dumps(completion)[:40]}")
    if _flag(body.get("logprobs"), "logprobs"):  # an explicit null top_logprobs asks for none (vLLM's: its None)
        overrides["logprobs"] = body["top_logprobs"] if "top_logprobs" in body else 0
    elif body.get("top_logprobs"):
        raise BodyError("top_logprobs needs logprobs: true")
    return messages, completion if completion is not None else body.get("max_tokens")


def _reasoning_renamed(message: Any) -> Any:
    """A Batch line's message with its `reasoning_content` (the field's older name, in DeepSeek's, Qwen's and older
    vLLM's histories) as `reasoning`, where it gives no `reasoning` of its own, as vLLM 0.26's chat request model
    renames it before the template sees it (`_normalize_messages_before`); dropped, a Qwen3 or DeepSeek template
    rendered the turn without its `<think>` text. `LLM.chat` and plain lines keep vLLM's `LLM.chat`, which reads
    only `reasoning`."""
    if not isinstance(message, dict) or "reasoning_content" not in message:
        return message
    renamed = {k: v for k, v in message.items() if k != "reasoning_content"}
    if message["reasoning_content"] is not None and renamed.get("reasoning") is None:
        renamed["reasoning"] = message["reasoning_content"]
    return renamed


def _completions_prompt(body: dict, overrides: dict) -> tuple[str | list[int], Any]:
    """A completions body's prompt (a string or token ids) and max_tokens; its logprobs into `overrides`."""
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # OpenAI's list of prompts, holding one (a string, or a list of token ids)
    if isinstance(prompt, list) and any(type(t) is float for t in prompt) and all(
            type(t) is int or (type(t) is float and t.is_integer()) for t in prompt):
        prompt = [int(t) for t in prompt]  # (as vLLM's server reads 504.0: a JSON writer's integer)
    if not isinstance(prompt, str) and not (isinstance(prompt, list) and prompt
              and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        raise BodyError("'prompt' must be a string or a non-empty list of token ids (one prompt per line: give "
                        "each prompt of a list its own line)")
    if body.get("logprobs") is not None:
        if isinstance(body["logprobs"], (int, float)) and not isinstance(body["logprobs"], bool) and \
                body["logprobs"] < 0:  # (vLLM's completions request: -1, the whole vocabulary, is chat's alone)
            raise BodyError("'logprobs' must be a positive value (or 0), got " + json.dumps(body["logprobs"]))
        overrides["logprobs"] = body["logprobs"]
    return prompt, body.get("max_tokens")


def tools_for_template(tools: Any) -> list[dict]:
    """Tools as vLLM's server hands them to the chat template (its pydantic models, dumped): each
    {"type": "function", "function": {"name", "description", "parameters", ...}}, description and parameters null
    where not given, strict and defer_loading only where given, other keys after, as given. Templates write
    them with tojson: the order and the nulls are in the prompt."""
    return [_tool_as_vllm_passes_it(k, tool) for k, tool in enumerate(list_of_objects(tools, "tools"))]


def no_empty_tools(obj: dict) -> None:
    """A line's (body's) `tools` may be absent, null or a non-empty list: `[]` is a BodyError whatever the
    tool_choice, as vLLM 0.26's request model refuses it (its check_tool_usage, matching OpenAI's API)."""
    if obj.get("tools") == []:
        raise BodyError("`tools` must not be an empty array. Either provide at least one tool or omit the field "
                        "entirely.")


def list_of_objects(value: Any, name: str) -> list[dict]:
    """`value`, a list of JSON objects (a body's or line's `tools` or `documents`), or a BodyError naming `name`."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise BodyError(f"'{name}' must be a list of objects")
    return value


def _tool_as_vllm_passes_it(k: int, tool: Any) -> dict:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or tool.get(
            "type", "function") != "function":
        raise BodyError(f'tools[{k}] must be {{"type": "function", "function": {{"name": ..., ...}}}}')
    if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
        raise BodyError(f"tools[{k}].function.parameters must be an object (a JSON schema)")
    declared = ("name", "description", "parameters", "strict", "defer_loading")
    defer = function.get("defer_loading")
    defer = tool.get("defer_loading") if defer is None else defer  # (vLLM's model copies the tool's down)
    dumped = {"name": function["name"], "description": function.get("description"),
              "parameters": function.get("parameters"), "strict": function.get("strict"), "defer_loading": defer}
    dumped = {key: value for key, value in dumped.items() if value is not None or key in declared[:3]}
    dumped.update((key, value) for key, value in function.items() if key not in declared)
    extra = {key: value for key, value in tool.items() if key not in ("type", "function", "defer_loading")}
    own = {"defer_loading": tool["defer_loading"]} if tool.get("defer_loading") is not None else {}
    return {"type": "function", "function": dumped, **own, **extra}


def _template_documents_and_tools(body: dict) -> dict[str, Any]:
    """A chat body's `documents` and `tools`, which vLLM gives to the chat template (whatever the tool_choice:
    `_forced_tool_call` reads it) where its chat_template_kwargs give no tools of their own."""
    given = {}
    documents = body.get("documents")
    if documents not in (None, []):
        given["documents"] = list_of_objects(documents, "documents")
    no_empty_tools(body)
    if body.get("tools") is not None:
        given["tools"] = tools_for_template(body["tools"])
    return given


def _named_logprobs(body: dict, chat: bool, overrides: dict) -> None:
    """vLLM's body field `logprob_token_ids`: the logprobs of these tokens at each position, in place of the top
    ones (every entry is listed); it needs logprobs (true in a chat body, any number in a completions body)."""
    ids = body.get("logprob_token_ids")
    if not ids:
        return
    if "logprobs" not in overrides:
        raise BodyError("'logprob_token_ids' needs logprobs " + ("true" if chat else "set (a number)"))
    overrides["logprob_token_ids"] = ids
    del overrides["logprobs"]  # (as vLLM's server: the named tokens replace the top ones)


def _echo(body: dict, chat: bool, prompt: Any, max_tokens: Any, overrides: dict) -> str | None:
    """A completions body's `echo`, as vLLM answers it: the prompt's text, tokens and (with logprobs) prompt
    logprobs before the output's; max_tokens 0 asks for the prompt alone (scoring a text). A chat body's echo
    shapes its response (`response_asks`) and, as vLLM's, asks for the prompt's logprobs where the body names no
    prompt_logprobs: `top_logprobs` of them (0 where not given: each prompt token's own logprob; an explicit
    null: none), the response's `prompt_logprobs`; None is returned for a chat."""
    if not _flag(body.get("echo"), "echo"):
        return None
    if chat:
        if "prompt_logprobs" not in overrides and body.get("top_logprobs", 0) is not None:
            overrides["prompt_logprobs"] = body.get("top_logprobs", 0)
        return None
    if not isinstance(prompt, str):
        raise BodyError("'echo' needs the prompt as text (a prompt of token ids is not echoed here)")
    if "logprobs" in overrides or "logprob_token_ids" in overrides:
        overrides.setdefault("prompt_logprobs", body.get("logprobs"))  # (vLLM's: the prompt's as many as the output's)
    if max_tokens == 0 and type(max_tokens) is int:
        if "logprob_token_ids" in overrides:
            raise BodyError("'logprob_token_ids' needs generated tokens: not with echo and max_tokens 0")
        return ECHO_PROMPT
    return ECHO_BOTH


CHAT_TEMPLATE_FIELDS = ("chat_template_kwargs", "add_generation_prompt", "continue_final_message", "reasoning_effort")
"""vLLM's chat request fields that go to the chat template (OpenAI's reasoning_effort, a string, as the template
keyword of that name: templates that take it, such as gpt-oss's, use it; others ignore it)."""


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
"""The reasoning_effort values vLLM 0.26's server takes."""
BODY_DECIDES = ("add_generation_prompt", "continue_final_message")
"""Template keywords an OpenAI chat body always decides, by its fields or their defaults (true, false), over its
chat_template_kwargs and the job's default ones, as vLLM's server merges them."""


def _chat_template_options(body: dict) -> tuple[dict[str, Any] | None, list | None]:
    """A chat body's keywords for its chat template, as vLLM's server merges them: the body's fields over its
    `chat_template_kwargs`: vLLM's `add_generation_prompt` and `continue_final_message` (booleans; BODY_DECIDES),
    `reasoning_effort` (a string), `documents` and `tools`; reasoning_effort also sets `enable_thinking` (false for
    "none") where chat_template_kwargs does not, for templates whose thinking is opt-in or opt-out (Qwen3, Gemma).
    With the body's own tools (as a template gets them; None: none), which drive the tool-call parser whatever
    tools the keywords give the template."""
    options = {}
    for name in CHAT_TEMPLATE_FIELDS[1:]:
        if body.get(name) is None:
            continue
        if name != "reasoning_effort":
            options[name] = _flag(body[name], name)  # ("false" is false, as vLLM's server reads it)
        elif not isinstance(body[name], str):
            raise BodyError(f"'{name}' must be a string")
        else:
            options[name] = body[name]
    if options.get("reasoning_effort") not in (None, *REASONING_EFFORTS):
        raise BodyError(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}, got "
                        f"{json.dumps(options['reasoning_effort'])[:40]}")
    given = _template_documents_and_tools(body)
    options.update(given)
    own = {k: v for k, v in (template_kwargs(body.get("chat_template_kwargs")) or {}).items() if k not in BODY_DECIDES}
    if options.get("reasoning_effort") is not None and "enable_thinking" not in own:
        options["enable_thinking"] = options["reasoning_effort"] != "none"  # (vLLM's: Qwen3's thinking follows it)
    merged = {**own, **options}
    if own.get("tools") is not None:  # (vLLM's server: the body's tools are defaults under chat_template_kwargs;
        merged["tools"] = own["tools"]  # the body's still drive the tool-call parser: `_forced_tool_call`)
    return merged or None, given.get("tools")


_FLAG_WORDS = {"true": True, "false": False, "t": True, "f": False, "yes": True, "no": False, "y": True, "n": False,
               "on": True, "off": False, "1": True, "0": False}
"""The strings vLLM's server (pydantic 2, lax) reads as a boolean, by their lower-case form."""


def _flag_of_text(text: str) -> bool | None:
    """The boolean vLLM's server reads from `text` (`_FLAG_WORDS`, any case, no surrounding spaces: pydantic refuses
    " false"), or None where it reads none."""
    return _FLAG_WORDS.get(text.lower())


def _lax_flag(value: Any) -> bool | None:
    """The boolean vLLM's server (pydantic, lax) reads from a value that is no boolean: 1 or 0 (1.0 or 0.0 too), or
    text (`_flag_of_text`); None where it reads none (a boolean itself included)."""
    if type(value) in (int, float) and value in (0, 1):
        return bool(value)
    return _flag_of_text(value) if isinstance(value, str) else None


def _flag(value: Any, name: str) -> bool:
    """A body's boolean field as vLLM's server reads it: true/false, 1/0, or such a string ("false" was taken as
    true for being a non-empty string); None is false; anything else is a BodyError naming the field."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if (flag := _lax_flag(value)) is not None:
        return flag
    raise BodyError(f"'{name}' must be true or false, got {json.dumps(value)[:40]}")


def _logit_bias(value: Any) -> dict:
    """OpenAI's logit_bias: token ids (as strings) to biases, each a number (or a number written as text, which
    vLLM's server reads) clamped to [-100, 100], as vLLM's server clamps it (NaN is refused, where vLLM's clamp
    turns it into -100 unsaid)."""
    if not isinstance(value, dict):
        raise BodyError("'logit_bias' must be an object mapping token ids to biases")
    clamped = {}
    for token, bias in value.items():
        if isinstance(bias, str):
            try:
                bias = float(bias)
            except ValueError:
                pass
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or math.isnan(bias):
            raise BodyError(f"logit_bias[{str(token)[:20]!r}] must be a number, got {json.dumps(value[token])[:40]}")
        clamped[token] = min(100.0, max(-100.0, bias))
    return clamped


def _response_format(value: Any) -> dict | None:
    """OpenAI's response_format as structured_outputs: text (nothing), json_object (any JSON
    object), json_schema ({"json_schema": {"name", "schema", "strict"}}) or vLLM's structural_tag (the whole
    response_format as the tag's JSON text: {"format": ...}, or the older {"structures", "triggers"})."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BodyError("response_format must be an object with a 'type' (text, json_object, json_schema, "
                        f"structural_tag), got {json.dumps(value)[:40]}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):  # (vLLM refuses one without too)
            raise BodyError("response_format.json_schema must be an object with a 'schema' object")
        return {"json": spec["schema"]}
    if kind == "structural_tag":
        return {"structural_tag": _structural_tag_format(value)}
    raise BodyError(f"response_format type {str(kind)[:40]!r} is not supported (text, json_object, json_schema, "
                    "structural_tag)")


def _structural_tag_format(value: dict) -> str:
    """A structural_tag response_format as vLLM's request model takes it: {"type", "format"}, or the older
    {"type", "structures": [{"begin", "schema", "end"}], "triggers": [strings]}; its JSON text (what vLLM passes
    on), or a BodyError as vLLM's "Invalid response_format structural_tag specification"."""
    legacy = ("structures" in value and isinstance(value["structures"], list)
              and all(isinstance(s, dict) and isinstance(s.get("begin"), str) and isinstance(s.get("end"), str)
                      and isinstance(s.get("schema", {}), (dict, type(None))) for s in value["structures"])
              and isinstance(value.get("triggers"), list) and all(isinstance(t, str) for t in value["triggers"]))
    if not legacy and "format" not in value:
        raise BodyError("invalid response_format structural_tag: give its 'format' (xgrammar's structural tag), or "
                        "'structures' ([{begin, schema, end}]) and 'triggers' ([strings])")
    if legacy:  # (as vLLM's model writes it: each structure's schema, null where none)
        value = {"type": "structural_tag", "triggers": value["triggers"],
                 "structures": [{"begin": s["begin"], "schema": s.get("schema"), "end": s["end"]}
                                for s in value["structures"]]}
    else:
        value = {"type": "structural_tag", "format": value["format"]}
    return json.dumps(value)


def text_message(j: int, message: Any) -> Any:
    """A chat message as vLLM gives it to the chat template, with its content as one string: a list of text parts
    is joined with newlines, empty ones left out (as vLLM does for a string-content chat template), null or no
    parts is empty text; any other part type is refused by name (BodyError, a ValueError). Only the keys vLLM
    passes on are kept (`_as_vllm_passes_it`). Plain lines and `LLM.chat` go through it too (`PromptProcessor`)."""
    if not isinstance(message, dict):
        return message  # the chat template check names it
    content = message.get("content")
    if isinstance(content, str):
        text = content
    elif content is None or content == []:  # (an assistant turn that only called tools): empty text, as vLLM's
        text = ""
    elif not isinstance(content, list):
        raise BodyError(f"messages[{j}].content must be a string, a list of text parts or null")
    else:
        text = "\n".join(text for text in _part_texts(j, content) if text)  # (vLLM's: "" too)
    return _as_vllm_passes_it(j, message, text)


def _as_vllm_passes_it(j: int, message: dict, content: Any) -> dict:
    """`message` as vLLM's `_parse_chat_message_content` hands it to the template, with `content`: its role and
    content; an assistant's `tool_calls` (their arguments as objects: `_with_tool_arguments_as_objects`) and its
    `reasoning`, also as `reasoning_content`; a tool message's `tool_call_id`; a developer message's `tools`; and
    `name` and `task` where they are strings. Any other key (an assistant's `reasoning_content` or `thinking`, a
    user's `tool_calls`, a key of the caller's own) reached the template, and changed what some templates render."""
    role = message.get("role")
    kept: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        if message.get("tool_calls") is not None:
            if not isinstance(message["tool_calls"], list):
                raise BodyError(f"messages[{j}].tool_calls must be a list of tool calls")
            kept = _with_tool_arguments_as_objects(j, {**kept, "tool_calls": message["tool_calls"]})
        if message.get("reasoning") is not None:
            kept["reasoning"] = kept["reasoning_content"] = message["reasoning"]
    elif role == "tool" and "tool_call_id" in message:
        kept["tool_call_id"] = message["tool_call_id"]
    for key in ("name", "task"):
        if isinstance(message.get(key), str):
            kept[key] = message[key]
    if role == "developer":
        kept["tools"] = message.get("tools")
    return kept


_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "thinking": "thinking"}
"""The content part types vLLM reads as text (the Responses API's input_text and output_text, a history's
refusal and thinking parts) -> the key holding the text."""


_KNOWN_PART_KEYS = frozenset({"type", "text", "refusal", "thinking", "closed", "image_url", "input_audio", "file",
                              "audio_url", "video_url", "image_embeds", "audio_embeds", "image_pil", "uuid", "data",
                              "name"})
"""The keys of vLLM 0.26's content part types (`_KNOWN_CONTENT_PART_FIELDS`): any other key of a text part (an
Anthropic-style `cache_control`) stays on the part it gives an "openai"-format template."""


def _part_texts(j: int, content: list) -> list[str]:
    """The texts of a message's content parts, as vLLM reads them (`_text_parts_with_extras`)."""
    return [text for text, _ in _text_parts_with_extras(j, content)]


def _text_parts_with_extras(j: int, content: list) -> list[tuple[str, dict]]:
    """The texts of a message's content parts, each with its keys beside vLLM's (`_KNOWN_PART_KEYS`), as vLLM reads
    them: a bare string is a text, a part without its text (null or missing) is skipped, and any part that is not
    text (`_TEXT_PARTS`) is refused by name."""
    texts = []
    for k, part in enumerate(content):
        if isinstance(part, str):
            texts.append((part, {}))
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str) or kind not in _TEXT_PARTS:  # (a list or object as the type: unhashable)
            shown = f"type {kind!r}" if isinstance(kind, str) else "no type"
            raise BodyError(f"messages[{j}].content[{k}] has {shown[:60]}; only text parts are supported "
                            f"({', '.join(_TEXT_PARTS)})")
        text = part.get(_TEXT_PARTS[kind])
        if text is None:  # (vLLM skips such a part)
            continue
        if not isinstance(text, str):
            raise BodyError(f"messages[{j}].content[{k}].{_TEXT_PARTS[kind]} must be a string")
        texts.append((text, {key: value for key, value in part.items() if key not in _KNOWN_PART_KEYS}))
    return texts


def text_parts(j: int, message: Any) -> Any:
    """A chat message with its content as OpenAI's list of text parts (vLLM's "openai" content format, for a
    template that loops over content): a string is one part, a list its own parts (checked as `text_message`
    checks them; empty ones kept, and each part's keys beside vLLM's, as vLLM keeps them), null none. A tool
    message's parts are one string, joined with newlines, empty parts too, as vLLM joins them in this format."""
    checked = text_message(j, message)
    if not isinstance(checked, dict):
        return checked
    content = message.get("content")
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    else:
        parts = [{"type": "text", "text": text, **extra} for text, extra in _text_parts_with_extras(j, content or [])]
    if checked.get("role") == "tool":
        return checked if isinstance(content, str) or not parts else {
            **checked, "content": "\n".join(part["text"] for part in parts)}
    return {**checked, "content": parts}


def _with_tool_arguments_as_objects(j: int, message: dict) -> dict:
    """An assistant message's tool calls as vLLM gives them to the chat template: each function's `arguments`, a
    JSON string in OpenAI's format, parsed, since templates write them with `tojson` (a string would be quoted
    twice); missing, empty or JSON null arguments are {}, any other JSON value is kept as parsed, and arguments
    that are not JSON fail the line by name, as vLLM 0.26's `_postprocess_messages` makes them (it raises there;
    they had been {} here); an empty list of calls dropped. A copy: the caller's message is left as it is."""
    calls = message["tool_calls"]
    if not calls:
        return {k: v for k, v in message.items() if k != "tool_calls"}
    parsed = []
    for k, call in enumerate(calls):
        where = f"messages[{j}].tool_calls[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise BodyError(f"{where} must be an object of type 'function' with a 'function' object")
        arguments = function.get("arguments")
        if not arguments:
            arguments = {}
        elif not isinstance(arguments, (dict, list)):
            if not isinstance(arguments, str):
                raise BodyError(f"{where}.function.arguments must be a JSON string or an object, got "
                                f"{type(arguments).__name__}")
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:  # (a call cut off by max_tokens, replayed in a later turn)
                raise BodyError(f"{where}.function.arguments is not JSON ({e.msg} at character {e.pos}): give the "
                                "call's arguments as a JSON object") from e
            arguments = {} if arguments is None else arguments
        parsed.append({**call, "function": {**function, "arguments": arguments}})
    return {**message, "tool_calls": parsed}


def _ids() -> tuple[str, str]:
    return f"batch_req_{uuid.uuid4().hex}", f"req_{uuid.uuid4().hex}"


class ResponseAsks(NamedTuple):
    """What an OpenAI body asks of its response beside the answer (vLLM's fields); None on a line asking nothing."""

    request_id: str | None = None
    """vLLM's `request_id`: the response's id is "chatcmpl-" (or "cmpl-") and it (even empty), in place of a random
    one."""
    return_token_ids: bool = False
    """vLLM's `return_token_ids`: each choice's `token_ids`, and the prompt's (`prompt_token_ids`)."""
    echoed_message: tuple[str, str] | None = None
    """A chat body's `echo`: its last message's (role, text), which starts each answer whose role is that one (the
    answer continues that message: vLLM's echo)."""
    include_reasoning: bool = True
    """A chat body's vLLM `include_reasoning`: false, under a job with a reasoning or tool-call parser, writes its
    answers without their `reasoning`, `logprobs` and `token_ids` (vLLM 0.26's server suppresses all three then;
    the content stays the parser's); without a parser it changes nothing, as in vLLM."""
    tokens_as_ids: bool | None = None
    """vLLM's `return_tokens_as_token_ids`: logprobs name each token "token_id:N" in place of its text; None: as
    the job's --return-tokens-as-token-ids (`LineServing.tokens_as_ids`)."""


_VLLM_BODY_TAIL = {"kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
"""The keys vLLM's response bodies always write after their usage (null here: no KV transfer or timing); before
it, `service_tier` (null: no tiers) and `system_fingerprint`."""


def success_record(custom_id: str, url: str, model: str, output, prompt_tokens: int,
                   top_logprobs: int | None = 0, role: str = "assistant", echo: tuple[str, str] | None = None,
                   tokenizer=None, reasoning_split=None, asks: ResponseAsks | None = None,
                   tool_call: ForcedToolCall | AutoToolChoice | None = None, parsers: bool = False,
                   fingerprint: str | None = None, tokens_as_ids: bool = False) -> dict[str, Any]:
    """A 200 response line, its body with the keys vLLM's run-batch writes (null where nothing is said).
    `top_logprobs` is how many alternatives each logprobs entry lists (None: all of its entries, in their order:
    the sampled token's, then those logprob_token_ids named); `role` is a chat answer's (vLLM's --response-role);
    `echo` a completions line's (`BodyRequest.echo`, the prompt's text), whose first prompt token (it has no
    logprobs) the tokenizer names; `reasoning_split` (text -> (reasoning, content): vLLM's --reasoning-parser)
    gives a chat message its `reasoning`; `asks`: the body's `request_id`, `return_token_ids` and a chat's `echo`
    (`ResponseAsks`); `tool_call`: a chat line's forced call or served "auto" choice, whose answers are read as the
    messages' tool calls (`tool_calls.message_calls`; `finish_reason` as vLLM's); `parsers`: whether the job runs a
    reasoning or tool-call parser (under one, a chat body's include_reasoning false drops the reasoning, logprobs
    and token ids: `ResponseAsks.include_reasoning`); `fingerprint`: the body's `system_fingerprint`. Each choice
    carries vLLM's `stop_reason` (the stop string or token id that ended it, else null). `tokens_as_ids`: the
    logprobs name their tokens "token_id:N" (vLLM's return_tokens_as_token_ids)."""
    asks = asks or ResponseAsks()
    line_id, request_id = _ids()
    completion_tokens = output.num_output_tokens
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if output.num_cached_tokens is not None:  # as OpenAI's usage: prompt tokens read from a cache (a shared prefix)
        usage["prompt_tokens_details"] = {"cached_tokens": output.num_cached_tokens, "created_cache_tokens": None,
                                          "multimodal_tokens": None}  # (vLLM's keys: its serializer writes nulls)
    head = {"object": "chat.completion" if url == CHAT_URL else "text_completion", "created": int(time.time()),
            "model": model}
    prompt_ids = [int(t) for t in output.prompt_token_ids] if asks.return_token_ids else None  # (numpy in run's)
    if url == CHAT_URL:
        suppressed = parsers and not asks.include_reasoning
        choices = []
        for c in output.outputs:
            message = _chat_message(role, c.text, reasoning_split, asks.echoed_message, tool_call)
            if suppressed:
                message["reasoning"] = None
            choices.append({"index": c.index, "message": message,
                            "logprobs": None if suppressed else _chat_logprobs(c, top_logprobs, tokens_as_ids),
                            "finish_reason": finish_reason_of(c.finish_reason, tool_call, "tool_calls" in message),
                            "stop_reason": c.stop_reason, "token_ids": None if suppressed else _token_ids(c, asks),
                            "routed_experts": None})
        body = {"id": f"chatcmpl-{_or_random(asks.request_id)}", **head, "choices": choices,
                "service_tier": None, "system_fingerprint": fingerprint, "usage": usage,
                "prompt_logprobs": _prompt_logprobs(output),
                "prompt_token_ids": prompt_ids, "prompt_text": None, **_VLLM_BODY_TAIL}
    else:
        body = {"id": f"cmpl-{_or_random(asks.request_id)}", **head,
                "choices": _completion_choices(output, echo, top_logprobs, tokenizer, asks, prompt_ids, tokens_as_ids),
                "service_tier": None, "system_fingerprint": fingerprint, "usage": usage, **_VLLM_BODY_TAIL}
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def _or_random(request_id: str | None) -> str:
    return uuid.uuid4().hex if request_id is None else request_id


def _token_ids(completion, asks: ResponseAsks) -> list[int] | None:
    return [int(t) for t in completion.token_ids] if asks.return_token_ids else None


def _completion_choices(output, echo, top_logprobs, tokenizer, asks: ResponseAsks, prompt_ids,
                        tokens_as_ids: bool = False) -> list[dict]:
    """A text completion's choices (`success_record`), each with the prompt's logprobs where asked, as vLLM
    writes them in a text completion."""
    prompt_logprobs = _prompt_logprobs(output)
    choices = []
    for c in output.outputs:
        text, token_ids, logprobs = _echoed(c, output, echo)
        # (echo with return_token_ids: the prompt's text is left out of the choice's, as vLLM leaves it; its tokens,
        # logprobs and offsets stay)
        shown = text[len(echo[1]):] if echo is not None and asks.return_token_ids else text
        choices.append({"index": c.index, "text": shown,
                        "logprobs": _completion_logprobs(token_ids, logprobs, text, top_logprobs, tokenizer,
                                                         tokens_as_ids),
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                        "token_ids": _token_ids(c, asks), "prompt_logprobs": prompt_logprobs,
                        "prompt_token_ids": prompt_ids, "routed_experts": None})
    return choices


def _chat_message(role: str, text: str | None, reasoning_split=None, echoed: tuple[str, str] | None = None,
                  tool_call: ForcedToolCall | AutoToolChoice | None = None) -> dict[str, Any]:
    """A chat answer's message as vLLM's ChatMessage writes it (`success_record`), after the echoed message's
    text where that message has the answer's role (vLLM's echo). A tool line's answer is its `tool_calls`
    (between function_call and reasoning, left out where there are none, as vLLM writes them) and the content
    `tool_calls.message_calls` leaves ("" for a forced call); the tool parser reads the content after the
    reasoning is split off, as vLLM's does."""
    reasoning, content = reasoning_split(text) if reasoning_split is not None and text is not None else (None, text)
    calls = []
    if tool_call is not None:
        calls, content = message_calls(content, tool_call)
    if echoed is not None:  # (vLLM's: the continued message's text, or nothing, before the content, even none)
        content = (echoed[1] if echoed[0] == role else "") + (content or "")
    return {"role": role, "content": content, "refusal": None, "annotations": None, "audio": None,
            "function_call": None, **({"tool_calls": calls} if calls else {}), "reasoning": reasoning}


def error_record(custom_id: str | None, message: str, code: str = "invalid_request") -> dict[str, Any]:
    """A failed line's record, in both shapes readers of OpenAI's error files look for: the response OpenAI's Batch
    API writes for a request it refused (status 400, the error in its body, as `{"error": {"message", "type",
    "param", "code"}}`) and the top-level `error` of its published schema (`{"code", "message"}`, which OpenAI
    itself leaves null; a resume reads the line number from its message)."""
    line_id, request_id = _ids()
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return {"id": line_id, "custom_id": custom_id, "response": {"status_code": 400, "request_id": request_id,
                                                                "body": body},
            "error": {"code": code, "message": message}}


def _token_bytes(lp) -> bytes:
    return lp.token_bytes if lp.token_bytes is not None else (lp.decoded_token or "").encode()


def _token_text(lp) -> str:
    """The token as OpenAI names it: the text of its bytes (a SentencePiece word's leading space included,
    which decoding it alone drops), or for a token that holds part of a character (its bytes are not whole
    UTF-8) "bytes:" and the bytes, those that do not decode escaped: "bytes: \\xf0\\x9f"."""
    return _named_bytes(_token_bytes(lp))


def _named_bytes(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + raw.decode("utf-8", "backslashreplace")


def _token_entry(lp) -> dict[str, Any]:
    return {"token": _token_text(lp), "logprob": lp.logprob, "bytes": list(_token_bytes(lp))}


def id_name(token_id: int) -> str:
    """A token named by its id, as vLLM's return_tokens_as_token_ids names it."""
    return f"token_id:{int(token_id)}"


def _id_entry(token_id: int, lp, sampled: bool) -> dict[str, Any]:
    """A chat logprobs entry naming its token by id (`id_name`), with vLLM's bytes: the sampled token's own (null
    where nothing decodes it: --skip-tokenizer-init), an alternative's those of its name."""
    name = id_name(token_id)
    if not sampled:
        return {"token": name, "logprob": lp.logprob, "bytes": list(name.encode())}
    known = lp.token_bytes is not None or lp.decoded_token is not None
    return {"token": name, "logprob": lp.logprob, "bytes": list(_token_bytes(lp)) if known else None}


def _top_items(entry: dict, k: int | None) -> list[tuple[int, Any]]:
    """The (token id, Logprob) of the k most likely tokens of one position (the sampled token may rank below them);
    k None: every entry in its order (the sampled token's, then the named ones of logprob_token_ids, as vLLM lists
    them)."""
    if k is None:
        return list(entry.items())
    return sorted(entry.items(), key=lambda item: item[1].rank)[:k]


def _chat_logprobs(c, k: int, tokens_as_ids: bool = False) -> dict[str, Any] | None:
    """A chat choice's logprobs, each token named by its text, or by its id where `tokens_as_ids`."""
    if c.logprobs is None:
        return None
    entry_of = _id_entry if tokens_as_ids else lambda _, lp, sampled: _token_entry(lp)
    content = [{**entry_of(token_id, entry[token_id], True),
                "top_logprobs": [entry_of(t, lp, False) for t, lp in _top_items(entry, k)]}
               for token_id, entry in zip(c.token_ids, c.logprobs)]
    return {"content": content}


def _prompt_logprobs(output) -> list[dict[str, dict] | None] | None:
    """vLLM's `prompt_logprobs` of a response (body field `prompt_logprobs`: k): null for the first prompt
    token, then per prompt token {token id: {"logprob", "rank", "decoded_token"}}, the token's own first,
    then the top k; None when not asked for."""
    if output.prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in entry.items()} for entry in output.prompt_logprobs]


def _echoed(c, output, echo: tuple[str, str] | None) -> tuple[str, list[int], list | None]:
    """A completion choice's (text, token ids, logprobs), the prompt's first where `echo` (how, the prompt's text)
    asks (vLLM's)."""
    if echo is None:
        return c.text, c.token_ids, c.logprobs
    how, prompt = echo
    prompt_logprobs = output.prompt_logprobs if c.logprobs is not None else None
    if how == ECHO_PROMPT:
        return prompt, list(output.prompt_token_ids), prompt_logprobs
    logprobs = None if c.logprobs is None else [*prompt_logprobs, *c.logprobs]
    return prompt + c.text, [*output.prompt_token_ids, *c.token_ids], logprobs


def _completion_logprobs(token_ids: list[int], logprobs: list | None, text: str, k: int | None,
                         tokenizer=None, tokens_as_ids: bool = False) -> dict[str, Any] | None:
    """OpenAI's completions logprobs. A position without logprobs (an echoed prompt's first token) has null
    ones, and its token named from its bytes as every other (`_token_text`; decoded alone, part of a character
    would read U+FFFD and count as a character of its own in the offsets after it). `tokens_as_ids`: tokens and
    alternatives named by id (`id_name`); the offsets still count the text's characters (vLLM's count the names')."""
    if logprobs is None:
        return None
    name_of = (lambda token_id, _: id_name(token_id)) if tokens_as_ids else lambda _, lp: _token_text(lp)
    tokens, token_logprobs, top, offsets, pieces, offset = [], [], [], [], [], 0
    characters = codecs.getincrementaldecoder("utf-8")("replace")  # a split character counts once, when whole
    for token_id, entry in zip(token_ids, logprobs):
        offsets.append(offset)
        if entry is None:
            from batchllm.output_processor import token_bytes  # (the output side's; imported where it is needed)

            raw = token_bytes(tokenizer, int(token_id)) if tokenizer is not None else b""  # (a prompt's: numpy)
            tokens.append(id_name(token_id) if tokens_as_ids else _named_bytes(raw))
            token_logprobs.append(None)
            top.append(None)
            pieces.append(characters.decode(raw))
            offset += len(pieces[-1])
            continue
        tokens.append(name_of(token_id, entry[token_id]))
        token_logprobs.append(entry[token_id].logprob)
        alternatives: dict[str, float] = {}
        for alternative, lp in _top_items(entry, k):  # two tokens may share a text name: the likelier keeps it
            alternatives.setdefault(name_of(alternative, lp), lp.logprob)
        alternatives.setdefault(tokens[-1], token_logprobs[-1])  # the sampled token always, as OpenAI and vLLM
        top.append(alternatives)
        pieces.append(characters.decode(_token_bytes(entry[token_id])))
        offset += len(pieces[-1])
    # a decoder may drop what the tokens' bytes hold at the start (SentencePiece's leading space)
    if text and (dropped := "".join(pieces).find(text)) > 0:
        offsets = [max(0, o - dropped) for o in offsets]
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
