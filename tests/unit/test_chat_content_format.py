"""Chat-template content-format detection ("auto"), as vLLM 0.26 decides it from the template's syntax tree."""

from __future__ import annotations

import copy

import pytest

from batchllm.inputs import loops_over_content, prompt_processor_for

PARTS = "{% for p in PLACE %}{{ p.text }}{% endfor %}"


def parts(over: str) -> str:
    return PARTS.replace("PLACE", over)


M = "{% for m in messages %}"
END = "{% endfor %}"

# Each changed shape, with the format vLLM detects: BatchLLM decided the other one.
CHANGED = {
    "messages aliased through a chain of sets": (
        "{% set a = messages %}{% set b = a | list %}{% for m in b %}" + parts("m.content") + END, "openai"),
    "a cycle of aliases": (
        "{% set a = messages %}{% set b = a %}{% set a = b %}{% for m in b[1:] %}" + parts("m['content']") + END,
        "openai"),
    "the name content under a filter": (
        "{% macro r(content) %}" + parts("content | selectattr('type', 'eq', 'text')") + "{% endmacro %}" + M
        + "{{ r(m.content) }}" + END, "string"),
    "content of a filtered message": (M + parts("(m | first).content") + END, "string"),
    "messages set on a namespace": (
        "{% set ns = namespace() %}{% set ns.msgs = messages %}" + M + parts("m.content") + END, "string"),
    "a loop over messages with two targets": ("{% for a, b in messages %}{% endfor %}" + M + parts("m.content")
                                              + END, "string"),
    "a first content loop with two targets": (
        M + "{% for k, v in m.content %}{% endfor %}" + parts("m.content") + END, "string"),
}

# Shapes whose decision was already vLLM's, kept.
KEPT = {
    "message.content": (M + parts("m.content") + END, "openai"),
    "message['content']": (M + parts("m['content']") + END, "openai"),
    "one alias, sliced": ("{% set loop_messages = messages[1:] %}{% for message in loop_messages %}"
                          + parts("message['content'] | reverse") + END, "openai"),
    "a macro's parameter named content (Qwen3.5)": (
        "{% macro render(content) %}{% if content is string %}{{ content }}{% else %}" + parts("content")
        + "{% endif %}{% endmacro %}" + M + "{{ render(m.content) }}" + END, "openai"),
    "a macro's other parameter": ("{% macro render(c) %}" + parts("c") + "{% endmacro %}" + M
                                  + "{{ render(m.content) }}" + END, "string"),
    "a set of a message's content": (M + "{% set c = m.content %}" + parts("c") + END, "string"),
    "a set of a message": (M + "{% set msg = m %}" + parts("msg.content") + END, "string"),
    "a loop over something other than content": (M + parts("m.tool_calls") + "{{ m.content }}" + END, "string"),
    "content of something other than a message": (
        "{% for t in tools %}" + parts("t.content") + END + "{{ messages }}", "string"),
    "messages on a namespace": ("{% set ns = namespace(msgs=messages) %}{% for m in ns.msgs %}"
                                + parts("m.content") + END, "string"),
    "a first content loop with one target": (M + parts("m.content") + "{% for k, v in m.content %}{% endfor %}"
                                             + END, "openai"),
    "plain": (M + "{{ m.content | trim }}" + END, "string"),
}

QWEN25_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not "
    "loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}{%- if message.content %}"
    "{{- '\\n' + message.content }}{%- endif %}{%- for tool_call in message.tool_calls %}{%- if tool_call.function "
    "is defined %}{%- set tool_call = tool_call.function %}{%- endif %}{{- tool_call.arguments | tojson }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3_STYLE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
LLAMA4_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for content in "
    "message['content'] | sort(attribute='type') %}{%- if content['type'] == 'text' %}{{- content['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|eot|>' }}{%- endfor %}")


@pytest.mark.parametrize("name", list(CHANGED))
def test_content_format_is_detected_as_vllm_detects_it(name):
    """BatchLLM followed one level of `{% set %}` aliases of messages (vLLM follows any chain), matched the name
    `content` and a message under filters (vLLM: the bare names only), and read shapes vLLM cannot (a
    namespace attribute or a tuple bound to messages or to the first content loop), for which vLLM takes
    its default, a string template: each template here rendered its content otherwise than vLLM."""
    template, detected = CHANGED[name]
    assert ("openai" if loops_over_content(template) else "string") == detected


@pytest.mark.parametrize("name", list(KEPT))
def test_shapes_vllm_already_agreed_on_keep_their_format(name):
    template, detected = KEPT[name]
    assert ("openai" if loops_over_content(template) else "string") == detected


def test_real_templates_keep_their_format():
    """SmolLM2's, a Qwen2.5-style and a Llama-3.1-style template take strings; a Llama-4-style one takes parts."""
    assert not loops_over_content(prompt_processor_for(None).tokenizer.chat_template)
    assert not loops_over_content(QWEN25_STYLE) and not loops_over_content(LLAMA3_STYLE)
    assert loops_over_content(LLAMA4_STYLE)


def test_a_chained_alias_template_gets_parts_and_the_format_argument_still_overrides():
    """The text reached a chained-alias parts template as a string, iterated by character: it was lost."""
    template = CHANGED["messages aliased through a chain of sets"][0]
    prompts = prompt_processor_for(None)
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert prompts.apply_chat_template(chat, chat_template=template) == "What is 2+2?"
    assert prompts.apply_chat_template(chat, chat_template=template, content_format="string") == ""
    assert prompts.apply_chat_template(chat, chat_template=M + "{{ m.content }}" + END, content_format="openai") == (
        "[{'type': 'text', 'text': 'What is 2+2?'}]")


def test_openai_format_parts_keep_empty_texts_and_their_own_keys_and_a_tool_result_joins_them_all():
    """In vLLM's "openai" content format a text part keeps its keys beside vLLM's (`cache_control`: they were
    dropped), and a tool message's parts are joined with newlines, empty ones too (an empty part was left out, one
    newline short of vLLM's prompt); the "string" format still leaves empty parts out."""
    prompts = prompt_processor_for(None)
    template = M + "{{ m.role }}={{ m.content }}|" + END
    parts_given = [{"type": "text", "text": "a"}, {"type": "text", "text": ""}, {"type": "text", "text": "b"}]
    chat = [{"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"},
                                          "uuid": "u"}]},
            {"role": "tool", "content": parts_given, "tool_call_id": "t"}]
    rendered = prompts.apply_chat_template(chat, chat_template=template, content_format="openai",
                                           add_generation_prompt=False)
    assert rendered == ("user=[{'type': 'text', 'text': 'q', 'cache_control': {'type': 'ephemeral'}}]|"
                        "tool=a\n\nb|"), rendered
    as_strings = prompts.apply_chat_template(chat, chat_template=template, content_format="string",
                                             add_generation_prompt=False)
    assert as_strings == "user=q|tool=a\nb|", as_strings


def test_named_templates_are_detected_on_the_one_transformers_renders():
    """A tokenizer holding named templates (a "default" and a "tool_use", as transformers loads
    additional_chat_templates/) failed every chat with TypeError (unhashable dict); vLLM detects the format on
    the template it renders: "tool_use" where tools are given, else "default"."""
    prompts = copy.copy(prompt_processor_for(None))
    prompts.tokenizer = copy.copy(prompts.tokenizer)
    prompts.tokenizer.chat_template = {"default": M + "{{ m.content }};" + END,
                                       "tool_use": M + parts("m.content") + ";" + END + "{{ tools | length }}"}
    chat = [{"role": "user", "content": "hi"}]
    assert prompts.apply_chat_template(chat) == "hi;"
    assert prompts.apply_chat_template(chat, kwargs={"tools": [{"type": "function", "function": {"name": "f"}}]}) == (
        "hi;1")
    prompts.tokenizer.chat_template = {"a": "{{ messages }}", "b": "{{ messages }}"}
    with pytest.raises(ValueError, match="conversation 3: This model has multiple chat templates with no default"):
        prompts.apply_chat_template(chat, 3)


def test_developer_messages_are_system_ones_where_the_template_names_no_such_role():
    """vLLM 0.26 (`renderers/hf.py`) turns OpenAI's "developer" messages into "system" ones where the chat template
    does not name the role, and merges the system messages into one at the front (a blank line between them). The
    default model's template rendered "<|im_start|>developer" after its own default system prompt."""
    prompts = prompt_processor_for(None)
    user = {"role": "user", "content": "Hi"}
    developer = {"role": "developer", "content": "Answer in French.", "tools": [{"type": "function"}]}
    assert prompts.apply_chat_template([developer, user]) == prompts.apply_chat_template(
        [{"role": "system", "content": "Answer in French."}, user])
    merged = prompts.apply_chat_template([{"role": "system", "content": "Be brief."}, user,
                                          {"role": "developer", "content": [{"type": "text", "text": "Answer"},
                                                                            {"type": "text", "text": "in French."}]}])
    assert merged == prompts.apply_chat_template([{"role": "system", "content": "Be brief.\n\nAnswer\nin French."},
                                                  user])
    assert "developer" not in merged
    named = "{% for m in messages %}{% if m.role == 'developer' %}DEV:{% endif %}{{ m.content }}|{% endfor %}"
    assert prompts.apply_chat_template([developer, user], chat_template=named, add_generation_prompt=False) == \
        "DEV:Answer in French.|Hi|"
