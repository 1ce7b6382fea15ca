"""Engine options derived from the config dataclasses: the `LLM` keywords and the CLI arguments.

Each option is declared once, as a field of a section of `EngineConfig` (config.py: default, help,
choices); its flat name (`block_size`) is its `LLM` keyword and, in kebab case (`--block-size`), its
CLI flag. Types come from the annotations: a bool is a `--x/--no-x` flag, an optional bool
(`async_scheduling`) takes auto|on|off, anything else takes a value of its type. Nothing here holds
state; a new option needs no line in this module.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import numbers
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from decimal import Decimal
from typing import Any

from batchllm.config import EngineConfig, refused_value_message
from batchllm.sampling_params import among
from batchllm.vllm_engine_args import VLLM_026_NOT_TAKEN

VLLM_ALIASES = {"enable_prefix_caching": "prefix_sharing", "num_gpu_blocks_override": "num_kv_blocks"}
"""vLLM keyword -> the BatchLLM option it means (the value is passed through unchanged)."""

VLLM_NONE_IS_DEFAULT = frozenset({"enable_chunked_prefill", "attention_backend"})
"""Options whose vLLM default is None (its automatic choice) where the default here is a value: None is taken as
that default."""

_GIB = 1 << 30
VLLM_CONVERTED = {"kv_cache_memory_bytes": ("kv_cache_memory_gib", lambda n: None if n is None else n / _GIB)}
"""vLLM keyword -> (the BatchLLM option it means, its value from vLLM's): vLLM counts the KV cache in bytes."""


@dataclass(frozen=True)
class NoEffect:
    """A vLLM option taken and dropped, as scripts and command lines pass it: why it changes nothing here."""

    why: str
    values: tuple[str, ...] | None = None
    """The only values taken (None: any)."""
    value_type: type | None = None
    """The type of its flag's value; None: a bare flag."""
    flag_aliases: tuple[str, ...] = ()
    """Other vLLM spellings of its flag (not `LLM` keywords)."""
    metavar: str | None = None
    """Its value's name in --help."""
    run_batch_only: bool = False
    """A flag of vLLM's run-batch command only, not an `LLM` keyword."""
    run_has_own_flag: bool = False
    """`run` has a flag of its name that does something: only `bench` and `EngineArgs.add_cli_args` add it."""
    nargs: str | None = None
    """Its flag's argparse nargs (None: one value, or none for a bare flag)."""
    async_engine: bool = False
    """A flag of vLLM's AsyncEngineArgs (its serve and bench commands take it, and run-batch), not an `LLM`
    keyword: `bench` takes it too."""


VLLM_NO_EFFECT = {
    "disable_log_stats": NoEffect("run logs no per-request or periodic statistics lines (--no-progress quiets "
                                  "the progress bar)", flag_aliases=("disable_log_requests",)),
    "disable_custom_all_reduce": NoEffect("tensor parallelism reduces through NCCL"),
    "swap_space": NoEffect("a preempted request is recomputed", value_type=float, metavar="GIB"),
    "tokenizer_mode": NoEffect("the tokenizer is transformers' (vLLM's auto for most models); no other mode is "
                               "supported", values=("auto", "hf"), value_type=str),
    "max_seq_len_to_capture": NoEffect("decode steps run as CUDA graphs at any context length "
                                       "(max_cudagraph_capture_size bounds their batch)", value_type=int),
    "use_tqdm_on_load": NoEffect("weights load without a progress bar"),
    "hf_token": NoEffect("nothing is downloaded: a model id is read from the local Hugging Face cache",
                         value_type=str),
    "served_model_name": NoEffect("names are given to OpenAI Batch responses by run --served-model-name",
                                  value_type=str, nargs="+", metavar="NAME", run_has_own_flag=True),
    "disable_async_output_proc": NoEffect("outputs are processed as steps finish"),
    "enable_log_requests": NoEffect("requests are not logged", run_batch_only=True, async_engine=True),
    "max_log_len": NoEffect("requests are not logged", value_type=int, metavar="N", run_batch_only=True),
    "output_tmp_dir": NoEffect("results are appended to the output as they finish", value_type=str,
                               metavar="DIR", run_batch_only=True),
    "enable_metrics": NoEffect("no metrics server is started (--stats writes the run's statistics)",
                               run_batch_only=True),
    "url": NoEffect("no metrics server is started", value_type=str, run_batch_only=True),
    "port": NoEffect("no metrics server is started", value_type=int, run_batch_only=True),
    "enable_prompt_tokens_details": NoEffect("usage always carries prompt_tokens_details", run_batch_only=True),
    "enable_force_include_usage": NoEffect("every response carries its usage", run_batch_only=True),
    "host": NoEffect("no metrics server is started", value_type=str, run_batch_only=True),
    "enable_log_outputs": NoEffect("outputs are not logged (they are in the output file)", run_batch_only=True),
    "enable_log_deltas": NoEffect("outputs are not logged (they are in the output file)", run_batch_only=True),
    "log_error_stack": NoEffect("a failed line's record carries its error's message; no stack is logged",
                                run_batch_only=True),
    "enable_per_request_metrics": NoEffect("no server is started", run_batch_only=True),
    "enable_server_load_tracking": NoEffect("no server is started", run_batch_only=True),
    "enable_tokenizer_info_endpoint": NoEffect("no server is started", run_batch_only=True),
    "chat_template_content_format": NoEffect("the content format is detected from the chat template, as vLLM's "
                                             "auto (LLM.chat takes chat_template_content_format)",
                                             values=("auto",), value_type=str, run_batch_only=True),
}
"""vLLM `LLM` keywords and `run` flags (run-batch's own: flags only) taken and dropped: none changes an answer
here."""

VLLM_SHORT_FLAGS = {"tensor_parallel_size": "-tp", "data_parallel_size": "-dp", "quantization": "-q",
                    "pipeline_parallel_size": "-pp", "optimization_level": "-O"}
"""vLLM's short spellings of its options' flags (of engine options: flags here too; of VLLM_NOT_TAKEN's: named in
the hint for such a flag)."""


def add_no_effect_arguments(group, run_batch: bool = True, async_engine: bool = False) -> None:
    """`VLLM_NO_EFFECT`'s flags, each stored under its keyword's name (`engine_kwargs_from_args` skips them):
    with `run_batch`, all of them (vLLM's run-batch takes them) but those `run` has a flag of its own for; else
    those of `LLM` keywords (`LLM(**vars(args))` takes them), and with `async_engine` vLLM's AsyncEngineArgs' too
    (its bench command takes them)."""
    for name, option in VLLM_NO_EFFECT.items():
        if option.run_has_own_flag and run_batch:
            continue
        if option.run_batch_only and not run_batch and not (async_engine and option.async_engine):
            continue
        flags = ["--" + n.replace("_", "-") for n in (name, *option.flag_aliases)]
        help_text = f"accepted for vLLM's command lines; no effect: {option.why}"
        if option.value_type is None:  # (--no-X too: vLLM's boolean flags are argparse's BooleanOptionalAction)
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=False,
                               help=help_text)
        elif option.values is not None:
            group.add_argument(*flags, dest=name, type=_only_values(option), default=option.values[0],
                               metavar="{" + ",".join(option.values) + "}", help=help_text)
        else:
            group.add_argument(*flags, dest=name, type=option.value_type, nargs=option.nargs, default=None,
                               metavar=option.metavar, help=help_text)


def _only_values(option: NoEffect):
    """The argparse type of a NoEffect flag that takes only `option.values`: another value is refused saying why
    (argparse's choices said only "invalid choice")."""
    def checked(value: str) -> str:
        if value not in option.values:
            raise argparse.ArgumentTypeError(f"{value!r} is not supported ({option.why}): only "
                                             f"{' or '.join(option.values)}")
        return value

    return checked


NO_EFFECT_GROUP = "vLLM options without effect here"
"""The --help group of `add_vllm_arguments`' `VLLM_NO_EFFECT` flags."""


def add_vllm_arguments(parser: argparse.ArgumentParser, *, run_batch: bool) -> None:
    """vLLM's flags that change nothing here (`VLLM_NO_EFFECT`: --disable-log-stats, --disable-log-requests,
    --swap-space ...) and those of options with no counterpart here (`VLLM_NOT_TAKEN`: -pp 1,
    --distributed-executor-backend mp, --task generate ...): the one definition `run` and `bench` both use, so that
    a vLLM command line that one takes the other takes too. `run_batch`: vLLM's run-batch flags as well (`run`'s);
    else those vLLM's bench takes (its EngineArgs' and AsyncEngineArgs'). Added after the command's own flags and
    engine options: a not-taken option whose flag the parser has already is the parser's."""
    add_no_effect_arguments(parser.add_argument_group(NO_EFFECT_GROUP), run_batch=run_batch, async_engine=True)
    add_not_taken_arguments(parser.add_argument_group(*NOT_TAKEN_GROUP), help_each=False)  # (listed in NOT_TAKEN_GROUP)


_ALIASES_OF = {name: tuple(a for a, n in VLLM_ALIASES.items() if n == name) for name in set(VLLM_ALIASES.values())}

TRI_STATE = {"auto": None, "on": True, "off": False}
"""CLI values of an optional bool option."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except for an option whose help already says "(default: ...)" in
    words (a default computed from other options): that one is not given a second "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


@dataclass(frozen=True)
class EngineOption:
    name: str
    section: str  # the EngineConfig field holding the option's config class (model, cache, ...)
    type: type  # int, float, str or bool; None is allowed as well where `optional`
    optional: bool
    default: Any
    help: str
    choices: tuple | None
    refused: dict[str, str] | None = None  # values vLLM takes that are refused here, each with the reason


@functools.cache
def engine_options() -> dict[str, EngineOption]:
    """Every engine option by its flat name, in declaration order (sections, then fields)."""
    options: dict[str, EngineOption] = {}
    for section, config_class in typing.get_type_hints(EngineConfig).items():
        hints = typing.get_type_hints(config_class)
        for f in fields(config_class):
            if f.name in options or f.default is MISSING or "help" not in f.metadata:
                raise TypeError(f"{config_class.__name__}.{f.name}: declare each option once, with config.option")
            base, optional = _base_type(hints[f.name])
            options[f.name] = EngineOption(f.name, section, base, optional, f.default, f.metadata["help"],
                                           f.metadata.get("choices"), f.metadata.get("refused"))
    return options


def _base_type(hint: Any) -> tuple[type, bool]:
    """(int, True) for `int | None`; (int, False) for `int`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"an option's type is one type or that type | None, not {hint}")
        return args[0], True
    return hint, False


def engine_config(**kwargs: Any) -> EngineConfig:
    """The EngineConfig of flat keyword options (`LLM`'s keywords); options not given keep their
    declared defaults. vLLM aliases (`VLLM_ALIASES`) are accepted, and `VLLM_NO_EFFECT` dropped; an unknown
    keyword is a TypeError that names it and the options closest to it. Paths are passed as strings."""
    options = engine_options()
    sections: dict[str, dict[str, Any]] = {}
    for key, value in _vllm_names_moved(kwargs).items():
        if key in VLLM_NO_EFFECT and not VLLM_NO_EFFECT[key].run_batch_only:
            if (allowed := VLLM_NO_EFFECT[key].values) is not None and value not in allowed:
                raise ValueError(f"{key}={value!r} is not supported (only {' or '.join(map(repr, allowed))})")
            continue
        if key in VLLM_NOT_TAKEN:
            if not_taken_accepts(key, value):
                continue  # vLLM's default, which asks for what runs here anyway
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise TypeError(f"{key}={shown} is not supported: {VLLM_NOT_TAKEN[key][1]}. {only_defaults_taken(key)}")
        option = options.get(VLLM_ALIASES.get(key, key))
        if option is None:
            raise TypeError(unknown_option_message(key))
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        if value is None and not option.optional and option.name in VLLM_NONE_IS_DEFAULT:
            continue  # vLLM's default, its automatic choice: the declared default here
        if option.name == "max_model_len" and (value == -1 or value == "auto"):
            value = None  # vLLM's: the model's context
        if option.name == "dtype" and type(value).__module__ == "torch" and type(value).__name__ == "dtype":
            value = str(value).removeprefix("torch.")  # LLM(dtype=torch.bfloat16), as vLLM takes it
        if option.type is bool and option.optional and isinstance(value, str) and value in TRI_STATE:
            value = TRI_STATE[value]  # as the flag parses it (LLM(**vars(args)) with EngineArgs.add_cli_args)
        _check_type(key, option, value)
        sections.setdefault(option.section, {})[option.name] = value
    return EngineConfig(**{s: c(**sections.get(s, {})) for s, c in typing.get_type_hints(EngineConfig).items()})


def _vllm_names_moved(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with vLLM's names of options (`VLLM_ALIASES`, `VLLM_CONVERTED`) moved onto the options they mean.
    Given None, such a name asks for nothing (an EngineArgs field left unset); given beside its option, it must mean
    the same value (an EngineArgs keeps both: `EngineArgs(enable_prefix_caching=False)` reads back False), else a
    TypeError names both."""
    moved = {k: v for k, v in kwargs.items() if v is not None or (k not in VLLM_ALIASES and k not in VLLM_CONVERTED)}
    for key in [k for k in moved if k in VLLM_ALIASES or k in VLLM_CONVERTED]:
        if key in VLLM_CONVERTED:
            name, convert = VLLM_CONVERTED[key]
            _check_type(key, EngineOption(key, "", int, True, None, "", None), moved[key])
            value, clash = convert(moved.pop(key)), "set the same thing"
        else:  # (kept under its own name where its option is not given: a bad value's error names it)
            name, clash, value = VLLM_ALIASES[key], "are the same option", moved[key]
        if name in moved and not among(moved[name], (value,)):
            raise TypeError(f"{key!r} and {name!r} {clash}; give one of them")
        if name in moved or key in VLLM_CONVERTED:
            moved.pop(key, None)
            moved[name] = value
    return moved


_TYPE_RULES = {int: ((numbers.Integral,), "an integer"), float: ((numbers.Real,), "a number"),
               str: ((str,), "a string"), bool: ((bool,), "True or False")}


def _check_type(key: str, option: EngineOption, value: Any) -> None:
    """A TypeError naming the option where `value` is not of its type (None where it is optional); it
    reached the engine, which failed far from the cause (max_model_len="4k": a comparison of str and int)."""
    if value is None and option.optional:
        return
    kinds, wanted = _TYPE_RULES[option.type]
    if not isinstance(value, kinds) or (option.type is not bool and isinstance(value, bool)):
        none = " or None" if option.optional else ""
        raise TypeError(f"engine option {key!r} must be {wanted}{none}, got {value!r}")


VLLM_NOT_TAKEN = {
    "revision": ((None,), "models are read from a directory or the local Hugging Face cache, never downloaded: "
                          "give the model as the directory of that revision"),
    "download_dir": ((None,), "nothing is downloaded: a model is read from its directory, or for a Hugging Face id "
                              "from the local Hugging Face cache; to use the models a vLLM download directory holds "
                              "(its models--org--name folders), point that cache at it (HF_HUB_CACHE=/data/models "
                              "for --download-dir /data/models), or give the model as its directory there"),
    "override_generation_config": ((None, {}), "give sampling defaults as SamplingParams (run: --temperature, "
                                               "--top-p, --top-k, --min-p, --repetition-penalty and --max-tokens)"),
    "hf_overrides": ((None, {}), "edit config.json in a copy of the model's directory"),
    "pipeline_parallel_size": ((1,), "pipeline parallelism is not supported; use tensor_parallel_size and "
                                     "data_parallel_size"),
    "distributed_executor_backend": ((None, "mp"), "tensor and data parallelism run in processes the engine starts "
                                                   "itself (for a Ray cluster: batchllm.ray or run --ray)"),
    "data_parallel_backend": (("mp",), "data parallelism runs in processes the engine starts itself (for a Ray "
                                       "cluster: batchllm.ray or run --ray)"),
    "enable_expert_parallel": ((False,), "the models here have no experts"),
    "compilation_config": ((None, {}), "the kernels are Triton's; CUDA graphs are set by enforce_eager and "
                                        "max_cudagraph_capture_size"),
    "task": (("generate", "auto"), "the engine generates text; pooling models (embed, classify, reward) are not "
                                   "supported"),
    "runner": (("generate", "auto"), "the engine generates text; pooling models are not supported"),
    "cpu_offload_gb": ((0, 0.0), "the weights stay on the device; use tensor_parallel_size for a model larger "
                                 "than one GPU"),
    "logprobs_mode": (("raw_logprobs",), "logprobs are the model's, before any sampling parameter changes them"),
    "limit_mm_per_prompt": ((None, {}), "prompts are text or token ids only"),
    "tokenizer_revision": ((None,), "the tokenizer is read from the tokenizer (or model) directory: give the "
                                    "directory of that revision"),
    "scheduling_policy": (("fcfs",), "requests run in the order the prefix-sharing plan gives them"),
    "speculative_config": ((None,), "speculative decoding is not supported"),
    "guided_decoding_backend": ((None, "auto", "xgrammar"), "structured output runs on xgrammar"),
    "structured_outputs_config": ((None,), "structured output runs on xgrammar, set per request "
                                           "(SamplingParams.structured_outputs); LLM(structured_outputs_config=...) "
                                           "asking for backend 'xgrammar' or 'auto' is taken"),
    "kv_transfer_config": ((None,), "disaggregated prefill is not supported"),
    "calculate_kv_scales": ((False,), "an fp8 KV cache's scales are set per tensor (kv_cache_dtype='fp8')"),
    "disable_sliding_window": ((False, True), "a sliding window caps the context: attention here has no window"),
    "enable_sleep_mode": ((False,), "sleep mode is not supported; shutdown() frees the device memory"),
    "model_impl": (("auto",), "the models are this engine's own"),
    "num_scheduler_steps": ((1,), "one step per schedule (async_scheduling overlaps the next schedule)"),
    "enable_lora": ((None, False), "LoRA adapters are not supported"),
    "convert": (("auto", "none"), "the engine generates text; pooling models are not supported"),
    "allowed_local_media_path": (("", None), "prompts are text or token ids only"),
    "allowed_media_domains": ((None,), "prompts are text or token ids only"),
    "mm_processor_kwargs": ((None, {}), "prompts are text or token ids only"),
    "offload_group_size": ((0,), "the weights stay on the device; use tensor_parallel_size for a model larger "
                                 "than one GPU"),
    "offload_num_in_group": ((1,), "the weights stay on the device"),
    "offload_prefetch_step": ((1,), "the weights stay on the device"),
    "offload_params": ((None, set()), "the weights stay on the device"),
    "enable_return_routed_experts": ((False,), "the models here have no experts"),
    "pooler_config": ((None,), "pooling models are not supported"),
    "profiler_config": ((None, {}), "profile with `batchllm bench --profile-out` (torch's profiler)"),
    "attention_config": ((None, {}), "the attention backend is this engine's own (Triton on a GPU)"),
    "quantization_config": ((None,), "quantization=\"fp8\" quantizes at load; a checkpoint's own quantization_config "
                                     "in config.json is read"),
    "logits_processors": ((None, []), "custom logits processor classes are not supported; SamplingParams has "
                                      "logit_bias, allowed_token_ids, bad_words and structured_outputs"),
    "spec_method": ((None,), "speculative decoding is not supported"),
    "spec_model": ((None,), "speculative decoding is not supported"),
    "spec_tokens": ((None,), "speculative decoding is not supported"),
    "lora_modules": ((None,), "LoRA adapters are not supported"),
    **{name: ((default,), "LoRA adapters are not supported")
       for name, default in (("max_loras", 1), ("max_lora_rank", 16), ("max_cpu_loras", None),
                             ("fully_sharded_loras", False), ("lora_dtype", "auto"), ("lora_target_modules", None),
                             ("default_mm_loras", None), ("enable_tower_connector_lora", False),
                             ("specialize_active_lora", False), ("enable_mixed_moe_lora_format", False),
                             ("enable_moe_shared_loras", False))},
    "enable_prompt_embeds": ((False,), "prompts are text or token ids; prompt embeddings are not supported"),
    "reasoning_parser": ((None, ""), "LLM's outputs keep the thinking in their text (as vLLM's LLM.generate); "
                                     "batchllm run --reasoning-parser splits chat answers, and chat_template_kwargs "
                                     "{\"enable_thinking\": False} turns Qwen3's off"),
    "default_chat_template_kwargs": ((None, {}), "a server option of vLLM's: give chat(..., chat_template_kwargs="
                                                 "{\"enable_thinking\": False}); batchllm run takes "
                                                 "--default-chat-template-kwargs"),
    "config_format": (("auto", "hf"), "models are Hugging Face directories (config.json)"),
    **VLLM_026_NOT_TAKEN,
}
"""vLLM options (`LLM` keywords; run-batch flags in kebab case) with no counterpart here: (the values that ask for
what runs here anyway, taken and dropped, as ported code passes vLLM's defaults; what to do instead of any other,
said when one is given)."""


_XGRAMMAR_SETTINGS = {"backend": ("auto", "xgrammar"), "disable_any_whitespace": (False, True),
                      "disable_additional_properties": (False, True), "disable_fallback": (False, True),
                      "reasoning_parser": ("",), "reasoning_parser_plugin": ("",),
                      "enable_in_reasoning": (False, True)}
"""vLLM's StructuredOutputsConfig fields and the values that ask for what runs here (JSON is compact and a schema's
objects take no unnamed property, unless additionalProperties allows them, whatever the three flags say:
README, structured output; a grammar holds from an answer's first token, which is what enable_in_reasoning true
asks, and what runs under false too: README, --reasoning-parser)."""


def _asks_for_xgrammar(config: Any) -> bool:
    """vLLM's structured_outputs_config (a dict, or its StructuredOutputsConfig) asking only for what runs here."""
    fields = config if isinstance(config, dict) else getattr(config, "__dict__", None)
    return isinstance(fields, dict) and all(
        among(value, _XGRAMMAR_SETTINGS.get(name, ())) for name, value in fields.items())


def not_taken_accepts(name: str, value: Any) -> bool:
    """Whether a `VLLM_NOT_TAKEN` option's value asks for what runs here anyway (taken and dropped): one of its
    listed values, type included, or a structured_outputs_config asking for xgrammar."""
    return among(value, VLLM_NOT_TAKEN[name][0]) or (name == "structured_outputs_config" and _asks_for_xgrammar(value))


def only_defaults_taken(name: str) -> str:
    """The sentence after a `VLLM_NOT_TAKEN` option's refusal: the values that are taken."""
    if name == "structured_outputs_config":
        return ("(Taken: vLLM's default, None, or a config of " + ", ".join(
            f"{field} {' or '.join(map(repr, values))}" for field, values in _XGRAMMAR_SETTINGS.items()) + ".)")
    return f"(Only vLLM's default, {' or '.join(map(repr, VLLM_NOT_TAKEN[name][0]))}, is taken.)"


def not_taken_hint(name: str) -> str:
    """What to do instead of a `VLLM_NOT_TAKEN` option, for a command line: the options it names written as
    flags (`batchllm run`'s hint for such a flag, and `EngineArgs.add_cli_args`' refusal)."""
    options = engine_options()
    return re.sub(r"\b[a-z]+(?:_[a-z]+)+\b", lambda m: "--" + m[0].replace("_", "-") if m[0] in options else m[0],
                  VLLM_NOT_TAKEN[name][1])


NOT_TAKEN_GROUP = ("vLLM options not taken here", "vLLM's flags for what has no counterpart here are taken at the "
                   "values that ask for what runs here anyway, and refused with what to do instead at any other: "
                   "-pp/--pipeline-parallel-size 1, --distributed-executor-backend mp, --task generate, "
                   "--scheduling-policy fcfs, --cpu-offload-gb 0, --compilation-config '{}', --hf-overrides '{}', "
                   "--revision None, --no-enable-lora, -O2 ... (every field of vLLM 0.26's EngineArgs that is no "
                   "option here: README, \"Python API\")")
"""(title, description) of the --help group of `run`'s and `bench`'s `add_not_taken_arguments` flags, which are
not listed one by one."""


def add_not_taken_arguments(group, *, help_each: bool = True) -> None:
    """A flag per `VLLM_NOT_TAKEN` option (`--pipeline-parallel-size`/`-pp`, `--revision`, `--enable-lora`
    ...), stored under its keyword's name, as vLLM's command line spells it: a value is read as vLLM reads these
    options' values (`_value_reader`: -pp 1 and -pp 01 are 1, --cpu-offload-gb 0 is 0.0, --compilation-config '{}'
    is {});
    a bool option is `--x` / `--no-x`. A value `LLM` takes (`not_taken_accepts`) is kept (`engine_kwargs_from_args`
    skips it, and `LLM(**vars(args))` drops it); any other is argparse's error, exit status 2, naming the flag, the
    value and what to do instead. An option whose flag the parser has already (run's --reasoning-parser) is its
    own; `help_each` False leaves the flags out of --help (the group's description speaks for them)."""
    existing = group._option_string_actions  # (an argument group shares its parser's flags)
    for name, (accepted, _) in VLLM_NOT_TAKEN.items():
        flags = ["--" + name.replace("_", "-")] + ([VLLM_SHORT_FLAGS[name]] if name in VLLM_SHORT_FLAGS else [])
        if name.startswith("_") or any(flag in existing for flag in flags):
            continue  # (vLLM's internal fields have no flag)
        taken = " or ".join(map(repr, accepted))
        help_text = (f"vLLM's; taken only as {taken}: {not_taken_hint(name)}".replace("%", "%%") if help_each
                     else argparse.SUPPRESS)
        if any(isinstance(value, bool) for value in accepted):
            group.add_argument(*flags, dest=name, action=_NotTakenSwitch, default=accepted[0], help=help_text)
        else:
            group.add_argument(*flags, dest=name, action=_NotTakenValue, type=_value_reader(accepted),
                               default=accepted[0], metavar="VALUE", help=help_text)
    _add_structured_outputs_fields(group, existing)


def _add_structured_outputs_fields(group, existing: dict) -> None:
    """vLLM's dotted flags of structured_outputs_config's fields, `--structured-outputs-config.backend xgrammar`
    (the field's name with _ or -): each sets that field of the option's dict (`_NotTakenField`), which is then
    checked as the JSON form `--structured-outputs-config '{"backend": "xgrammar"}'` is, with its messages."""
    for field in _XGRAMMAR_SETTINGS:
        flags = [f"--structured-outputs-config.{spelling}" for spelling in dict.fromkeys(
            (field, field.replace("_", "-")))]
        if not any(flag in existing for flag in flags):
            group.add_argument(*flags, dest="structured_outputs_config", action=_NotTakenField, type=vllm_flag_value,
                               metavar="VALUE", help=argparse.SUPPRESS)


def _value_reader(accepted: tuple) -> Callable[[str], Any]:
    """How a `VLLM_NOT_TAKEN` flag's value is read, by the type of the values it takes, as vLLM's parser types the
    option: a number option (int, or float where a float is taken: --cpu-offload-gb) reads its text as that
    number, so `-pp 01` is 1 (and taken) as in vLLM; any other, or a text that is no such number, `vllm_flag_value`
    (refused then, naming the value)."""
    kinds = {type(value) for value in accepted if value is not None and not isinstance(value, bool)}
    number = float if float in kinds else int if kinds == {int} else None
    if number is None:
        return vllm_flag_value

    def read(text: str) -> Any:
        try:
            return number(text)
        except ValueError:
            return vllm_flag_value(text)

    return read


def vllm_flag_value(text: str) -> Any:
    """A `VLLM_NOT_TAKEN` flag's value as vLLM's parser reads these options: None for "None", JSON where it parses
    (numbers, objects, lists, true/false), else the text (fcfs, mp, generate)."""
    if text == "None":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _refuse_unless_taken(action: argparse.Action, value: Any) -> None:
    """The refusal `LLM` gives this value of the option (what to do instead, the values taken), as argparse's
    error naming the flag; nothing where `LLM` takes the value."""
    if not not_taken_accepts(action.dest, value):
        raise argparse.ArgumentError(action, f"{value!r:.60} is not supported: {not_taken_hint(action.dest)}. "
                                             f"{only_defaults_taken(action.dest)}")


class _NotTakenValue(argparse.Action):
    """A `VLLM_NOT_TAKEN` option's flag with a value: taken where `LLM` takes it, else refused saying why."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _refuse_unless_taken(self, values)
        setattr(namespace, self.dest, values)


class _NotTakenField(argparse.Action):
    """A dotted flag of one field of a dict option (`--structured-outputs-config.backend`): the field set in the
    option's dict (a copy: the default stays), the whole dict taken where `LLM` takes it, else refused saying why."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        field = option_string.split(".", 1)[1].replace("-", "_")
        current = getattr(namespace, self.dest, None)
        merged = {**(current if isinstance(current, dict) else {}), field: values}
        _refuse_unless_taken(self, merged)
        setattr(namespace, self.dest, merged)


class _NotTakenSwitch(argparse.BooleanOptionalAction):
    """A `VLLM_NOT_TAKEN` bool option's `--x` / `--no-x` (vLLM's spelling): taken where `LLM` takes the value."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _refuse_unless_taken(self, not option_string.startswith("--no-"))
        super().__call__(parser, namespace, values, option_string)


def unknown_option_message(key: str) -> str:
    if key in {alias for option in VLLM_NO_EFFECT.values() for alias in option.flag_aliases}:
        return (f"unknown engine option {key!r}: a flag of vLLM's commands (batchllm run takes it, without effect), "
                "no LLM keyword, as in vLLM")
    close = difflib.get_close_matches(key, [*engine_options(), *VLLM_ALIASES], n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"unknown engine option {key!r}{hint} (the options: the \"engine options\" groups of batchllm run --help)"


def add_engine_arguments(parser: argparse.ArgumentParser, *, names: Iterable[str] | None = None,
                         exclude: Iterable[str] = ()) -> None:
    """Add a `--kebab-name` argument per engine option (all, or `names`, less `exclude`), one
    argument group per config section, with the declared defaults. Read them back with
    `engine_kwargs_from_args`."""
    options = engine_options()
    wanted = (set(options) if names is None else set(names)) - set(exclude)
    for name in sorted(wanted - set(options)):
        raise TypeError(unknown_option_message(name))
    groups: dict[str, Any] = {}
    for option in options.values():
        if option.name in wanted:
            if option.section not in groups:
                groups[option.section] = parser.add_argument_group(f"engine options: {option.section}")
            _add_argument(groups[option.section], option, option.default)


CASE_FOLDED = frozenset({"quantization"})
"""Options whose value vLLM lowercases before checking it (its ModelConfig's validator): `-q FP8` is `-q fp8`."""


def _add_argument(group, option: EngineOption, default: Any) -> None:
    flags = ["--" + name.replace("_", "-") for name in (option.name, *_ALIASES_OF.get(option.name, ()))]
    flags += [VLLM_SHORT_FLAGS[option.name]] if option.name in VLLM_SHORT_FLAGS else []
    if option.type is bool and option.optional:  # a bare flag is "on", as vLLM's (see `bare_flags_as_on`)
        tri = next(k for k, v in TRI_STATE.items() if v is default)
        action = group.add_argument(*flags, dest=option.name, choices=list(TRI_STATE), default=tri, nargs="?",
                                    const="on")
        group.add_argument(*("--no-" + flag[2:] for flag in flags), dest=option.name, action="store_const",
                           const="off", default=argparse.SUPPRESS, help=f"the same as {flags[0]} off (vLLM's spelling)")
    elif option.type is bool:
        action = group.add_argument(*flags, dest=option.name, action=argparse.BooleanOptionalAction, default=default)
    else:
        value_type = option.type
        if option.type is int:
            value_type = human_readable_int_or_auto if option.optional else human_readable_int
            value_type = context_length if option.name == "max_model_len" else value_type
        elif option.name in CASE_FOLDED:
            value_type = str.lower
        if option.refused:
            value_type = _refusing(value_type, option)
        action = group.add_argument(*flags, dest=option.name, type=value_type, choices=option.choices, default=default)
    # set after: BooleanOptionalAction adds its own; a literal % in the text is escaped for argparse's % formatting
    action.help = option.help.replace("%", "%%") + " (default: %(default)s)"
    for key, (name, convert) in VLLM_CONVERTED.items():  # vLLM's flag for it in other units (--kv-cache-memory-bytes)
        if name == option.name:
            group.add_argument("--" + key.replace("_", "-"), dest=name, default=argparse.SUPPRESS, metavar=key.upper(),
                               type=lambda text, convert=convert: convert(human_readable_int(text)),
                               help=f"vLLM's spelling of {flags[0]}, in bytes (4G = 4 GiB)")


def _refusing(value_type: Callable[[str], Any], option: EngineOption) -> Callable[[str], Any]:
    """`value_type` for a flag whose option refuses some values (`config.option`'s refused): argparse says the
    reason the config gives, where its choice check would only list the choices."""
    def parse(text: str) -> Any:
        value = value_type(text)
        if value in option.refused:
            raise argparse.ArgumentTypeError(refused_value_message(option.name, value, option.refused[value]))
        return value

    parse.__name__ = getattr(value_type, "__name__", "value")  # (argparse names the type in its errors)
    return parse


def dashed_flag_names(argv: list[str]) -> list[str]:
    """`argv` with underscores in each long flag's name written as dashes (`--max_model_len=4k` ->
    `--max-model-len=4k`), as vLLM's command line reads them; values, and every word after `--`, are kept."""
    result = []
    for i, word in enumerate(argv):
        if word == "--":
            return result + argv[i:]
        if word.startswith("--"):
            name, equals, value = word.partition("=")
            word = name.replace("_", "-") + equals + value
        result.append(word)
    return result


def bare_flags_as_on(argv: list[str], all_flags: Iterable[str] = ()) -> list[str]:
    """`argv` with each bare optional-bool flag that is not followed by one of its values (auto, on,
    off) written as `--flag=on`. Its value is optional, so argparse would take the next word for it:
    `run --async-scheduling in.jsonl -o out.jsonl` was refused as "invalid choice: 'in.jsonl'". A word that
    abbreviates one such flag and no other of `all_flags` (the command's), as argparse reads abbreviations
    (`--async`), is that flag."""
    flags = {"--" + name.replace("_", "-") for option in engine_options().values()
             if option.type is bool and option.optional for name in (option.name, *_ALIASES_OF.get(option.name, ()))}
    known = set(all_flags) or flags  # (the command's flags where given: `plan` has no --async-scheduling)
    result = []
    for i, word in enumerate(argv):
        if word == "--":  # the rest are positional words
            return result + argv[i:]
        if word.startswith("--") and word not in known and "=" not in word:
            matches = [flag for flag in known if flag.startswith(word)]
            word = matches[0] if len(matches) == 1 and matches[0] in flags else word
        follows_a_value = i + 1 < len(argv) and argv[i + 1] in TRI_STATE
        result.append(f"{word}=on" if word in flags and not follows_a_value else word)
    return result


def human_readable_int(text: str) -> int:
    """An integer, or one written as vLLM's command line takes it: a decimal suffix k, m, g, t (4k = 4,000,
    25.6k = 25,600; a fraction of one is dropped) or a binary K, M, G, T on a whole number (4K = 4,096)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgtKMGT])", text.strip())
    if match is None:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r} (e.g. 4096, 4k = 4,000, 4K = 4,096)") from None
    number, suffix = match.groups()
    if suffix.islower():
        return int(Decimal(number) * 1000 ** "kmgt".index(suffix) * 1000)
    if "." in number:
        raise argparse.ArgumentTypeError(f"{text!r}: a binary suffix ({suffix}) takes a whole number; "
                                         f"{number}{suffix.lower()} is decimal")
    return int(number) * 1024 ** ("KMGT".index(suffix) + 1)


def human_readable_int_or_auto(text: str) -> int | None:
    """`human_readable_int`, or None for "auto" (the option's automatic choice, its default)."""
    return None if text.strip().lower() == "auto" else human_readable_int(text)


def context_length(text: str) -> int | None:
    """--max-model-len: `human_readable_int_or_auto`, and -1 also None (the model's context), as vLLM takes it and
    as `LLM(max_model_len=-1)` is taken here (it reached the model's rotary tables as a length)."""
    return None if text.strip() == "-1" else human_readable_int_or_auto(text)


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options present in parsed arguments, as `LLM` / `engine_config` keywords."""
    kwargs = {}
    for name, option in engine_options().items():
        if hasattr(args, name):
            value = getattr(args, name)
            kwargs[name] = TRI_STATE[value] if option.type is bool and option.optional else value
    return kwargs
