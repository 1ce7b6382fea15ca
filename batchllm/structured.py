"""Structured output: a request's tokens kept to a JSON schema, any JSON object, a regex, a choice
among strings, an EBNF grammar or a structural tag (free text whose tagged parts keep to their
schemas), with xgrammar (the grammar library vLLM and SGLang use).

xgrammar is an optional extra (`pip install batchllm[structured]`), imported only when a request
asks for structured output; without it such a request is refused by name
(`StructuredOutputUnavailable`), and the rest of the batch runs.

`StructuredOutputsParams` is vLLM's shape. `grammar_key` turns it into the plain (kind, text) pair
that crosses the scheduler/runner seam (`SamplingSpec.grammar`). `GrammarBackend` (one per engine,
given the tokenizer by `LLM`) compiles each distinct grammar once (the facade compiles every line's
grammar before the batch runs, so a grammar that does not compile is that line's
`StructuredOutputError`) and makes the per-request matchers the runner advances.

Writer: the runner owns the matchers (`GrammarState`); the backend's cache is written only by
`compile`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any

try:  # Python's regex parser: re._parser from 3.11, sre_parse before
    from re import _constants as _re_constants  # type: ignore[attr-defined]
    from re import _parser as _re_parser  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_constants as _re_constants
    import sre_parse as _re_parser

logger = logging.getLogger(__name__)

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class StructuredOutputError(ValueError):
    """A structured-output request the grammar library cannot compile (named on its line)."""


class StructuredOutputUnavailable(StructuredOutputError):
    """Structured output asked for, but xgrammar is not installed."""


@dataclass
class StructuredOutputsParams:
    """vLLM's `StructuredOutputsParams`: exactly one of the constraint fields."""

    json: str | dict | None = None
    """A JSON schema (a dict or its JSON text)."""
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    """An EBNF grammar (xgrammar's dialect: GBNF, with `root` as the start rule)."""
    json_object: bool | None = None
    """Any JSON object."""
    disable_any_whitespace: bool = False
    """vLLM's (False there: whitespace anywhere in JSON). JSON comes out compact whatever it says: a small model
    given free whitespace may emit it until max_tokens."""
    disable_additional_properties: bool = False
    """vLLM's; whatever it says, an object takes no property its schema does not name unless its
    additionalProperties is true or a schema (xgrammar's strict mode)."""
    disable_fallback: bool = False
    """vLLM's; there is one grammar backend (xgrammar) and no fallback."""
    whitespace_pattern: str | None = None
    """vLLM's; taken and not used, as vLLM 0.26 takes it (no backend of its reads it): JSON is compact here."""
    structural_tag: str | None = None
    """vLLM's: xgrammar's structural tag as JSON text, either {"type": "structural_tag", "format": {...}} or the
    older {"structures": [{"begin", "schema", "end"}], "triggers": [...]} (an OpenAI response_format of type
    "structural_tag" is either, whole)."""
    backend: str | None = None
    """vLLM 0.10's GuidedDecodingParams.backend; None, "auto" or "xgrammar" (the one backend here)."""

    def __post_init__(self) -> None:
        if self.structural_tag is not None and (not isinstance(self.structural_tag, str) or not self.structural_tag):
            raise ValueError("structured_outputs.structural_tag must be a structural tag's JSON text")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ValueError("structured_outputs.whitespace_pattern must be a string (taken and not used, as in vLLM "
                             "0.26: JSON is compact here)")
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(_KINDS)}, got "
                             f"{', '.join(given) or 'none'}")
        for name in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs.{name} must be true or false")
        if self.backend not in (None, "auto", "xgrammar"):
            raise ValueError(f"structured_outputs.backend {self.backend!r} is not available: xgrammar is the one "
                             "backend (None, 'auto' or 'xgrammar')")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object or its JSON text)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            # ("" is a choice, as in vLLM 0.26: root ::= "" | "spam"; an empty list is a grammar with no rule there)
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        if self.json_object is not None and self.json_object is not True:
            raise ValueError("structured_outputs.json_object must be true")

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutputsParams:
        """From a JSONL / request body value: an instance or a dict of its fields."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError("structured_outputs must be an object with one of " + ", ".join(_KINDS))
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"structured_outputs: unsupported field(s) {', '.join(map(str, unknown))[:200]}")
        return cls(**value)


GuidedDecodingParams = StructuredOutputsParams
"""vLLM 0.10's name of StructuredOutputsParams (SamplingParams.guided_decoding, now structured_outputs)."""


def grammar_key(params: StructuredOutputsParams) -> tuple[str, str]:
    """The plain (kind, canonical text) that names a grammar: equal constraints give equal keys. A schema
    keeps its key order (the grammar writes an object's properties in the schema's order, as OpenAI and
    vLLM do: "reasoning" before "answer" must come out first)."""
    if params.json is not None:
        schema = json.loads(params.json) if isinstance(params.json, str) else params.json
        return "json", json.dumps(schema, separators=(",", ":"))
    if params.json_object:
        return "json", '{"type":"object"}'
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:
        return "grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
    if params.structural_tag is not None:
        return "structural_tag", params.structural_tag
    return "grammar", params.grammar


def _reason(error: Exception) -> str:
    """xgrammar's message without its log prefix ("[06:34:48] /project/cpp/x.cc:94: ")."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", lines[0])[:300]


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise StructuredOutputUnavailable(
            "structured output needs the xgrammar package: pip install 'batchllm[structured]'") from e
    return xgrammar


def _without_comment(line: str) -> str:
    return re.sub(r"(#|//).*$", "", line).strip()


def _is_lark(grammar: str) -> bool:
    """vLLM's rule: a grammar none of whose lines (comments aside) defines a rule with "::=" is Lark, not EBNF."""
    return not any("::=" in _without_comment(line) for line in grammar.splitlines())


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def lark_as_ebnf(grammar: str) -> str:
    """A Lark grammar in xgrammar's EBNF, as vLLM 0.26 converts it: the root is the `start` rule, else the first
    rule; `?name` is `name`; 'single-quoted' literals are double-quoted; a rule's `|` lines are its alternatives;
    lines that define no rule (%import, %ignore) are dropped. ValueError naming the line or the rule otherwise (a
    /regex/ terminal: vLLM's conversion fails on it too, and hands the Lark text to its guidance backend, which is
    not here; it read as "rules used but not defined" naming the regex's letters)."""
    rules: dict[str, list[str]] = {}
    current = None
    for number, line in enumerate(map(_without_comment, grammar.splitlines()), start=1):
        if line.startswith("|"):
            if current is None:
                raise ValueError(f"line {number}: an alternative '|' before any rule")
            rules[current].append(_lark_definition(line[1:], number))
        elif ":" in line:
            name, definition = line.split(":", 1)
            current = name.strip().strip("?")
            rules[current] = [_lark_definition(definition, number)]
    if not rules:
        raise ValueError("no rule found (a Lark rule is `name: definition`)")
    used = {name for alternatives in rules.values() for text in alternatives
            for name in re.findall(r"\b[A-Za-z_]\w*\b", _QUOTED.sub(" ", text))}
    if undefined := sorted(used - set(rules) - {"root"}):
        raise ValueError(f"rules used but not defined: {', '.join(undefined)}")
    root = "start" if "start" in rules else next(iter(rules))
    return "\n".join([f"root ::= {root}", *(f"{name} ::= {' | '.join(alts)}" for name, alts in rules.items())])


def _lark_definition(text: str, number: int) -> str:
    """One alternative line of a Lark rule in EBNF (`_double_quoted`); ValueError for a /regex/ terminal."""
    quoted = _double_quoted(text.strip(), number)
    if re.search(r"/[^/]+/", _QUOTED.sub(" ", quoted)):
        raise ValueError(f"line {number}: a Lark regular expression (/.../) is not supported (no grammar backend "
                         "here reads Lark's regexes): write it with EBNF character classes (root ::= [a-z]+) or "
                         "give it as structured_outputs.regex")
    return quoted


def _double_quoted(text: str, number: int) -> str:
    if text.count("'") % 2 or text.count('"') % 2:
        raise ValueError(f"line {number}: mismatched quotes")
    # as vLLM swaps the quotes: escapes inside stay escapes ('\n' is a newline); a bare " inside is escaped
    return re.sub(r"'([^']*)'", lambda literal: '"' + re.sub(r'(?<!\\)"', r'\\"', literal[1]) + '"', text)


GRAMMARS_CACHED = 1024
"""Compiled grammars a GrammarBackend keeps (least recently used dropped first): ~50 MiB of JSON schemas."""


class GrammarBackend:
    """Compiles grammars for one tokenizer and vocabulary (the model's logits width), caching each."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer, self._stop = tokenizer, sorted(stop_token_ids)
        self._compiler = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def compile(self, key: tuple[str, str]):
        """The compiled grammar of `key`; StructuredOutputError naming the problem if it does not compile. The
        GRAMMARS_CACHED most recently used stay compiled (a file whose lines each bring a schema would otherwise
        keep every one: ~50 KiB each)."""
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
            return compiled
        xgr = _import_xgrammar()
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self._stop or None)
            self._compiler = xgr.GrammarCompiler(info)
        kind, text = key
        what = _KIND_NAMES[kind]
        _check_enforced(kind, text)
        try:
            if kind == "json":
                compiled = self._compile_schema(xgr, text)
            elif kind == "regex":
                compiled = self._compiler.compile_regex(text)
            elif kind == "structural_tag":
                compiled = self._compile_structural_tag(xgr, text)
            elif _is_lark(text):
                compiled = self._compiler.compile_grammar(lark_as_ebnf(text))
            else:
                compiled = self._compiler.compile_grammar(text)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own errors
            raise StructuredOutputError(f"structured output: the {what} cannot be compiled: {_reason(e)}") from e
        if not GrammarState(xgr.GrammarMatcher(compiled), self.vocab_size).allows_a_token():
            raise StructuredOutputError(f"structured output: the {what} matches no string (it allows no first token)")
        self._cache[key] = compiled
        while len(self._cache) > GRAMMARS_CACHED:
            self._cache.popitem(last=False)  # (a request running it holds its own reference)
        return compiled

    def _compile_structural_tag(self, xgr, text: str):
        """A structural tag compiled as vLLM's xgrammar backend compiles it: the older form (its "structures" and
        "triggers") through xgrammar's deprecated call, any other as the JSON text it is."""
        tag = json.loads(text)
        if isinstance(tag, dict) and "structures" in tag:
            items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                     for s in tag["structures"]]
            return self._compiler.compile_structural_tag(items, tag["triggers"])
        return self._compiler.compile_structural_tag(text)

    def _compile_schema(self, xgr, text: str):
        """A JSON schema compiled as compact JSON (no free whitespace: a small model may otherwise emit it forever),
        its length-bounded strings' characters rewritten (`escaped_bounded_strings`) where xgrammar wrote them."""
        grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False)
        ebnf = str(grammar)
        fixed = escaped_bounded_strings(ebnf)
        if fixed == ebnf:
            return self._compiler.compile_json_schema(text, any_whitespace=False)
        return self._compiler.compile_grammar(fixed)

    def new_state(self, key: tuple[str, str]) -> GrammarState:
        xgr = _import_xgrammar()
        return GrammarState(xgr.GrammarMatcher(self.compile(key)), self.vocab_size)

    def allocate_bitmask(self, rows: int):
        """A [rows, ceil(vocab / 32)] int32 host tensor of allowed-token bits."""
        return _import_xgrammar().allocate_token_bitmask(rows, self.vocab_size)


_BOUNDED_CHARACTER = r'[^\"\\\r\n]'
r"""The character class xgrammar 0.2.9 writes for one character of a string with minLength / maxLength (its issue
#800), as a rule or inline: it lets raw control characters (a tab) into the JSON and no escape out of it. Its other
string classes differ ([^\0-\x1f\"\\\r\n] is an unbounded string's)."""
_EBNF_ATOM = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')
"""A quoted literal or a character class of xgrammar's EBNF (a literal may hold brackets, a class quotes)."""
_STRING_CHARACTER = r'(([^\0-\x1f\"\\\uD800-\uDFFF]) | ("\\" {escape}))'
_STRING_ESCAPE = (r'{escape} ::= (([\"\\/bfnrt]) | ("u" (([0-9a-cA-Ce-fE-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]) '
                  r'| ([dD] [0-7] [0-9a-fA-F] [0-9a-fA-F]))))')
r"""One character of a JSON string (RFC 8259): unescaped (no control character, quote or backslash) or escaped.
A \u escape of a UTF-16 surrogate is left out: a pair decodes to one character, which the grammar would count as two
(a character past the BMP is written raw, one character to both). So is a raw surrogate, which xgrammar's class took as
the three bytes UTF-8 would give it: not UTF-8, they decoded to three replacement characters (maxLength 2 let six
through)."""


def escaped_bounded_strings(ebnf: str) -> str:
    """`ebnf` (xgrammar's grammar of a JSON schema) with each length-bounded string's character class replaced by
    exactly one JSON string character, raw or escaped: its repetition {min, max} then counts the decoded string's
    characters, as JSON Schema's minLength / maxLength do. Literals and other classes are kept; unchanged where
    xgrammar wrote no such class."""
    if _BOUNDED_CHARACTER not in ebnf:
        return ebnf
    names = set(re.findall(r"^(\w+) ::=", ebnf, re.MULTILINE))
    escape = next(name for i in range(len(names) + 1) if (name := f"json_string_escape_{i}") not in names)
    character = _STRING_CHARACTER.format(escape=escape)
    fixed = _EBNF_ATOM.sub(lambda atom: character if atom[0] == _BOUNDED_CHARACTER else atom[0], ebnf)
    return fixed if fixed == ebnf else fixed.rstrip("\n") + "\n" + _STRING_ESCAPE.format(escape=escape) + "\n"


_XGRAMMAR_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
                               "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})
"""The string formats xgrammar enforces (vLLM's list of them, `backend_xgrammar.py`)."""
_UNENFORCED = (({"integer", "number"}, ("multipleOf",)), ({"array"}, ("uniqueItems", "contains", "minContains",
                                                                       "maxContains")))
"""Keywords xgrammar ignores, by the schema type they belong to (vLLM's check of them, `backend_xgrammar.py`)."""


def _length_bound_with_pattern(node: dict) -> str | None:
    """minLength / maxLength beside a pattern or format: xgrammar keeps the pattern and drops the bound."""
    bound = next((k for k in ("minLength", "maxLength") if k in node), None)
    shape = next((k for k in ("pattern", "format") if k in node), None)
    return f"{bound!r} with {shape!r} (put the length in the pattern, e.g. ^[a-z]{{1,3}}$)" if bound and shape else None


_UNENFORCED_ANYWHERE = ("not", "if", "dependentRequired", "dependentSchemas", "dependencies")
"""Keywords of any schema that xgrammar compiles to the grammar it would give without them (vLLM does not check
these: it runs them unenforced)."""


_TYPED_KEYWORDS = ("pattern", "format", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
                   "exclusiveMaximum")
"""String and number keywords, which xgrammar enforces only in a schema that gives its "type"."""
_TYPE_GIVERS = ("type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf")
_INFERRED_TYPES = (({"object"}, ("properties", "additionalProperties", "unevaluatedProperties")),
                   ({"array"}, ("items", "prefixItems", "unevaluatedItems")))
"""The keywords from which xgrammar gives a schema without a "type" its type (measured, xgrammar 0.2.9: {"items": {}}
takes only arrays; {"minItems": 2}, {"required": [...]}, {"patternProperties": ...}, {"propertyNames": ...} alone take
any JSON value)."""
_COUNTED_KEYWORDS = ("minItems", "maxItems", "minProperties", "maxProperties", "patternProperties", "propertyNames")
"""Array and object keywords xgrammar enforces only in a schema whose type it knows (given, or `_INFERRED_TYPES`:
{"minItems": 2} took [1], {"maxProperties": 1} took {"a": 1, "b": 2})."""
_COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf")
"""Keywords whose schemas replace their node's own: xgrammar drops typed keywords beside them."""


_RAW_IN_JSON = frozenset(range(0x20)) | {ord('"'), ord("\\")}
"""Characters a JSON string holds only escaped: control characters, the quote and the backslash."""


@functools.lru_cache(maxsize=1024)
def _kept_as_json_string(pattern: str) -> bool:
    """Whether xgrammar keeps a string `pattern` as a JSON-string regex (`Regex(..., json_string=true)`), whose answers
    it escapes, so that no character of it reaches the JSON raw. Measured on xgrammar 0.2.9: it does so for most
    patterns, whatever they match ("^[ -~]{1,80}$", '^(a|")$'), and writes others as raw grammar ("^\\t$", '^"$',
    "^[\\t ]+$"), in which a control character, quote or backslash comes out unescaped. False where xgrammar cannot
    be asked (the character check then decides alone)."""
    try:
        schema = json.dumps({"type": "string", "pattern": pattern})
        text = str(_import_xgrammar().Grammar.from_json_schema(schema, any_whitespace=False))
    except Exception:  # (xgrammar missing, or a pattern it cannot read: it reports that itself at compile time)
        return False
    return "json_string=true" in text


def _raw_pattern_character(pattern: str) -> str | None:
    """The first character of `pattern` (a regex, read by Python's re) that it matches as itself, a literal or a
    range of a class, and that a JSON string holds only escaped (`_RAW_IN_JSON`), as repr; None if none (negated
    classes, `.`, \\s and the like are not searched: xgrammar 0.2.9 keeps those as a JSON-string Regex, which
    escapes them). Only a pattern xgrammar writes as raw grammar is searched (`_kept_as_json_string`): there such a
    literal ("^\\t$", '^"$', "^[\\x00-\\x1f]$") comes out as a raw tab or quote, not JSON, and no escape is taken
    instead; a pattern xgrammar keeps as a JSON-string regex ("^[ -~]{1,80}$") is safe whatever it matches."""
    if _kept_as_json_string(pattern):
        return None
    consts = _re_constants
    for op, arg in _regex_nodes(pattern):
        if op is consts.LITERAL and arg in _RAW_IN_JSON:
            return repr(chr(arg))
        if op is consts.IN and not (arg and arg[0][0] is consts.NEGATE):
            for item, value in arg:
                low, high = (value, value) if item is consts.LITERAL else value if item is consts.RANGE else (1, 0)
                if (found := next((c for c in sorted(_RAW_IN_JSON) if low <= c <= high), None)) is not None:
                    return repr(chr(found))  # (\x00 is 0)
    return None


def _has_lookaround(pattern: str) -> bool:
    """Whether `pattern` (a regex, read by Python's re) holds a lookahead or lookbehind ("(?!0000)", "(?=a)"), which
    xgrammar 0.2.9 drops from a schema's pattern with only a warning on stderr ("Lookahead assertion is not supported
    and is ignored"): {"pattern": "^(?!0000)[0-9]{4}$"} answered "0000". (Its regex kind refuses one by name.)"""
    return any(op in (_re_constants.ASSERT, _re_constants.ASSERT_NOT) for op, _ in _regex_nodes(pattern))


def _regex_nodes(pattern: str) -> Iterator[tuple[Any, Any]]:
    """Every (op, argument) node of `pattern` as Python's re parses it, the insides of groups, branches, repeats and
    atomic groups entered (an assertion's are not: the checks stop at it); none where it does not parse (not these
    checks' problem: xgrammar reports a pattern it cannot read)."""
    try:
        stack = [_re_parser.parse(pattern)]
    except (re.error, RecursionError, OverflowError):
        return
    consts = _re_constants
    while stack:
        for op, arg in stack.pop():
            yield op, arg
            if op is consts.SUBPATTERN:
                stack.append(arg[-1])
            elif op is consts.BRANCH:
                stack.extend(arg[1])
            elif op in (consts.MAX_REPEAT, consts.MIN_REPEAT, getattr(consts, "POSSESSIVE_REPEAT", None)):
                stack.append(arg[2])
            elif op is getattr(consts, "ATOMIC_GROUP", None):
                stack.append(arg)


def _raw_pattern(node: dict, types: set[str]) -> str | None:
    """A string pattern, a patternProperties key or a propertyNames pattern that xgrammar would not keep to: one with
    a lookaround it ignores (`_has_lookaround`), or with a character it writes raw into the JSON string
    (`_raw_pattern_character`), named with it."""
    patterns = [node["pattern"]] if "string" in types and isinstance(node.get("pattern"), str) else []
    if "object" in types:
        names = node.get("propertyNames")
        patterns += [names["pattern"]] if isinstance(names, dict) and isinstance(names.get("pattern"), str) else []
        patterns += list(node["patternProperties"]) if isinstance(node.get("patternProperties"), dict) else []
    for pattern in patterns:
        if _has_lookaround(pattern):
            return (f"the pattern {pattern[:40]!r}, whose lookahead or lookbehind xgrammar ignores (answers could "
                    "break it)")
        if found := _raw_pattern_character(pattern):
            return (f"the pattern {pattern[:40]!r}, which matches the character {found} (xgrammar writes it into "
                    "the JSON string unescaped, which is then not JSON)")
    return None


def _inferred_types(node: dict) -> set[str]:
    """The types xgrammar gives a schema without a "type" (`_INFERRED_TYPES`); empty where it gives none."""
    return set().union(*(kinds for kinds, keywords in _INFERRED_TYPES if any(k in node for k in keywords)))


def _unenforced_combination(node: dict, types: set[str], known: set[str], root: Any) -> str | None:
    """The keyword combinations xgrammar compiles but does not enforce: those vLLM's current check finds (vLLM
    0.26 checks fewer), `_UNENFORCED_ANYWHERE`, and string, number, array or object bounds without a type.
    types: the node's "type"; known: those or, where none is given, the types xgrammar infers
    (`_inferred_types`), which the object and array checks read."""
    if found := next((k for k in _UNENFORCED_ANYWHERE if k in node), None):
        return repr(found)
    if node.get("type") == []:  # (no value has no type; xgrammar reads it as no type given)
        return "'type' [] (an empty list of types: xgrammar then lets any JSON value through)"
    if found := _unenforced_literal(node) or _unenforced_required(node, known) or _overlapping_one_of(node):
        return found
    typed = next((k for k in _TYPED_KEYWORDS if k in node), None)
    untyped = typed or (None if known else next((k for k in _COUNTED_KEYWORDS if k in node), None))
    if untyped and not any(k in node for k in _TYPE_GIVERS):
        return f'{untyped!r} without a "type" (xgrammar then lets any JSON value through: give the type)'
    if typed and (combinator := next((k for k in _COMBINATORS if k in node), None)):
        return f"{typed!r} beside {combinator!r} (xgrammar enforces it only inside a branch: put it in each)"
    for combinator in ("anyOf", "oneOf"):
        branches = node.get(combinator)
        if isinstance(branches, list) and any(isinstance(b, dict) and "required" in b and "properties" not in b
                                              for b in branches):
            return (f"{combinator!r} branches listing required properties without their 'properties' (xgrammar "
                    "then enforces neither: repeat the properties in each branch)")
    if "string" in types and (found := _length_bound_with_pattern(node)):
        return found
    if found := _raw_pattern(node, known) or _number_range_xgrammar_cannot_write(node, types):
        return found
    if "object" in known and "propertyNames" in node:
        names = node["propertyNames"]
        if isinstance(names, dict) and (found := _length_bound_with_pattern(names)):
            return f"{found} in 'propertyNames'"
        if other := next((k for k in ("patternProperties", "properties") if k in node), None):
            return f"'propertyNames' with {other!r}"
        if node.get("unevaluatedProperties", True) is not True:
            return "'propertyNames' with 'unevaluatedProperties'"
    if "object" in known and isinstance(node.get("patternProperties"), dict):
        if "properties" in node:
            return "'patternProperties' with 'properties'"
        if len(node["patternProperties"]) > 1:
            return "'patternProperties' with more than one pattern"
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) >= 2:
        return "'allOf' of several schemas (xgrammar lets anything through)"
    return _dropped_beside_combinator(node, types, root)


_WRITTEN_DECIMALS = 6
"""The most decimal places xgrammar writes in a number between two bounds (measured, xgrammar 0.2.9: a range holding
no such number compiled to an empty value, and {"p": } came out, ended as a "stop")."""


def _decimal(value: Any) -> Fraction | None:
    """A JSON number's exact decimal value (a float as its shortest repr: 1e-07 is 1/10^7); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return Fraction(value) if isinstance(value, int) else Fraction(repr(value)) if math.isfinite(value) else None


def _number_range_xgrammar_cannot_write(node: dict, types: set[str]) -> str | None:
    """A number's bounds (one lower, one upper) between which lies no number of `_WRITTEN_DECIMALS` decimal places,
    though the range is not empty (an empty one xgrammar refuses itself): its grammar would take an empty value."""
    lows = [(k, _decimal(node[k])) for k in ("minimum", "exclusiveMinimum") if k in node]
    highs = [(k, _decimal(node[k])) for k in ("maximum", "exclusiveMaximum") if k in node]
    if "number" not in types or len(lows) != 1 or len(highs) != 1 or lows[0][1] is None or highs[0][1] is None:
        return None
    (low_key, low), (high_key, high) = lows[0], highs[0]
    if low > high or (low == high and (low_key, high_key) != ("minimum", "maximum")):
        return None
    step = Fraction(1, 10 ** _WRITTEN_DECIMALS)
    first = math.ceil(low / step) * step
    if first == low and low_key == "exclusiveMinimum":
        first += step
    if first < high or (first == high and high_key == "maximum"):
        return None
    return (f"{low_key!r} {node[low_key]} with {high_key!r} {node[high_key]}, a range holding no number of at most "
            f"{_WRITTEN_DECIMALS} decimal places (all xgrammar writes between two bounds: its grammar would take an "
            "empty value; widen the range, or scale the quantity)")


_LITERALS = ("const", "enum")
"""Keywords listing a schema's values; xgrammar's grammar is then those values alone (const's where both are given)."""
_LITERAL_KEEPS = {
    "minLength": ("string", lambda v, b: len(v) >= b), "maxLength": ("string", lambda v, b: len(v) <= b),
    "pattern": ("string", lambda v, b: _pattern_keeps(v, b)),
    "minimum": ("number", lambda v, b: v >= b), "maximum": ("number", lambda v, b: v <= b),
    "exclusiveMinimum": ("number", lambda v, b: v > b), "exclusiveMaximum": ("number", lambda v, b: v < b),
    "multipleOf": ("number", lambda v, b: Fraction(str(v)) % Fraction(str(b)) == 0),
    "minItems": ("array", lambda v, b: len(v) >= b), "maxItems": ("array", lambda v, b: len(v) <= b),
    "minProperties": ("object", lambda v, b: len(v) >= b), "maxProperties": ("object", lambda v, b: len(v) <= b),
    "required": ("object", lambda v, b: all(name in v for name in b)),
}
"""Keywords beside enum / const that a listed value is checked against, as JSON Schema reads them: (the type of
values it constrains, whether value v keeps bound b). A pattern is read by `regex` (`_pattern_keeps`)."""
_PATTERN_TIMEOUT_S = 1.0
"""How long a pattern may take to judge one listed value: a backtracking engine takes exponential time on patterns
such as ^(a+)+$, and Python's re cannot be stopped (not even by Ctrl-C), so a schema's check hung a whole job."""


def _pattern_keeps(value: str, pattern: str) -> bool:
    """Whether `pattern` finds a match in `value`, its classes ASCII as ECMA-262's \\d and \\w are, read by `regex`
    (re's syntax) within _PATTERN_TIMEOUT_S; ValueError where it cannot tell (a pattern regex does not read, or one
    that takes longer)."""
    import regex

    try:
        return regex.search(pattern, value, regex.ASCII, timeout=_PATTERN_TIMEOUT_S) is not None
    except (regex.error, TimeoutError) as e:
        raise ValueError(f"pattern {pattern[:40]!r}: {e}") from None
_LITERAL_DROPS = {
    "string": ("format",),
    "array": ("items", "prefixItems", "additionalItems", "contains", "minContains", "maxContains", "uniqueItems",
              "unevaluatedItems"),
    "object": ("properties", "patternProperties", "additionalProperties", "propertyNames", "unevaluatedProperties",
               "dependentRequired", "dependentSchemas", "dependencies"),
    None: ("anyOf", "oneOf", "allOf", "not", "if"),
}
"""Keywords beside enum / const that this check does not evaluate, by the type of values they constrain (None: all)."""


def _json_types(value: Any) -> set[str]:
    """The JSON Schema types of `value` (parsed JSON): an int, or a float without a fraction, is "integer" too."""
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, (int, float)):
        return {"integer", "number"} if isinstance(value, int) or value.is_integer() else {"number"}
    return {type(None): {"null"}, str: {"string"}, list: {"array"}, dict: {"object"}}.get(type(value), set())


def _literal_keeps(keyword: str, bound: Any, value: Any, node: dict) -> bool | None:
    """Whether listed `value` keeps its node's `keyword: bound` (True for keywords that do not constrain it: titles,
    another type's bounds, unknown names); None where this cannot tell (`_LITERAL_DROPS`, an odd bound, a pattern re
    does not read)."""
    types = _json_types(value)
    if keyword == "type":
        return bool(types & _types(node))
    if keyword == "enum":  # (beside const; 1.0 is not read as 1 here)
        if not isinstance(bound, list):
            return None
        return json.dumps(value, sort_keys=True) in {json.dumps(v, sort_keys=True) for v in bound}
    if keyword in _LITERAL_KEEPS:
        kind, keeps = _LITERAL_KEEPS[keyword]
        wanted = str if keyword == "pattern" else list if keyword == "required" else (int, float)
        if kind not in types:
            return True
        if not isinstance(bound, wanted) or isinstance(bound, bool):
            return None
        try:
            return bool(keeps(value, bound))
        except (re.error, ValueError, TypeError, ArithmeticError):
            return None
    dropped = any(keyword in names and (kind is None or kind in types) for kind, names in _LITERAL_DROPS.items())
    return None if dropped else True


def _unenforced_literal(node: dict) -> str | None:
    """enum / const beside a keyword xgrammar drops. Measured (xgrammar 0.2.9): a schema with const or enum compiles
    to its listed values alone (const's where both are given), every other keyword beside them dropped (type,
    bounds, anyOf, ...), and a $ref beside them wins instead, dropping them. Taken: siblings that every listed value
    keeps (nothing is lost); refused: enum / const beside $ref, a sibling some value breaks, one this cannot
    evaluate on a value it constrains."""
    literal = next((k for k in _LITERALS if k in node), None)
    if literal is None:
        return None
    if "$ref" in node:
        return f"{literal!r} beside '$ref' (xgrammar keeps the referenced schema and drops it: put it there)"
    values = [node["const"]] if literal == "const" else node["enum"]
    if not isinstance(values, list):
        return None  # (xgrammar's compile names it)
    for keyword, bound in node.items():
        for value in values if keyword != literal else ():
            keeps = _literal_keeps(keyword, bound, value, node)
            if keeps is None:
                return (f"{keyword!r} beside {literal!r} (xgrammar keeps only the listed values and drops it, and "
                        "this check cannot tell whether they keep it)")
            if not keeps:
                return (f"{keyword!r} beside {literal!r}, which {json.dumps(value)[:40]} breaks (xgrammar keeps "
                        "only the listed values and drops it: list only values that keep it)")
    return None


def _unenforced_required(node: dict, types: set[str]) -> str | None:
    """`required` names xgrammar drops. Measured (xgrammar 0.2.9): those missing from the node's own 'properties'
    (strict mode writes only the listed properties, so {} passes, whatever additionalProperties says), and all of
    them beside a $ref, anyOf, oneOf or allOf (whose schemas replace the node's). Not read where the node cannot be
    an object, nor beside enum / const (`_unenforced_literal` reads it there)."""
    required = node.get("required")
    if isinstance(required, list) and not all(isinstance(name, str) for name in required):
        return (f"'required' holding {json.dumps(next(n for n in required if not isinstance(n, str)))[:40]} (it "
                "lists property names: strings)")
    if (not isinstance(required, list) or not required or (types and "object" not in types)
            or any(k in node for k in _LITERALS)):
        return None
    if combinator := next((k for k in _COMBINATORS if k in node), None):
        return f"'required' beside {combinator!r} (xgrammar enforces it only inside a branch: put it in each)"
    properties = node.get("properties")
    if missing := [name for name in required if not isinstance(properties, dict) or name not in properties]:
        return (f"'required' naming {', '.join(json.dumps(name) for name in missing)[:60]} without its schema in "
                "'properties' (xgrammar writes only the listed properties, so {} passes: give each its schema)")
    return None


_REPLACED_BESIDE_COMBINATOR = ("properties", "patternProperties", "propertyNames", "minProperties",
                               "maxProperties", "items", "prefixItems", "additionalItems", "minItems", "maxItems",
                               "multipleOf")
"""Keywords a schema's $ref / anyOf / oneOf / allOf replaces (measured, xgrammar 0.2.9: {"type": "object",
"properties": {"a": ...}, "anyOf": [{"type": "object"}]} took {}). additionalProperties is not among them: strict
mode takes no unnamed property anywhere."""
_OBJECT_KEYWORDS = ("properties", "required", "patternProperties", "additionalProperties", "minProperties")
_ARRAY_KEYWORDS = ("items", "prefixItems", "minItems", "maxItems")


def _local_target(ref: Any, root: Any) -> Any:
    """The schema a local "#/..." $ref names in `root`; None where it is not one or names nothing."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _replaced_types(branch: Any, root: Any, depth: int = 0) -> set[str]:
    """The types xgrammar gives a branch's values, where plain to see: listed values' or "type"'s
    (`_branch_value_types`), else an object's or array's from its keywords, else a local $ref's; empty where
    unknown (also past 16 $refs: they may loop)."""
    if not isinstance(branch, dict) or depth > 16:
        return set()
    if found := _branch_value_types(branch):
        return found
    if any(k in branch for k in _OBJECT_KEYWORDS):
        return {"object"}
    if any(k in branch for k in _ARRAY_KEYWORDS):
        return {"array"}
    target = _local_target(branch.get("$ref"), root)
    return _replaced_types(target, root, depth + 1) if "$ref" in branch else set()


def _dropped_beside_combinator(node: dict, types: set[str], root: Any) -> str | None:
    """Keywords beside a $ref / anyOf / oneOf / allOf that xgrammar drops (it writes the combinator's schemas alone):
    those of `_REPLACED_BESIDE_COMBINATOR` (taken where every branch gives its own: nothing the user meant is lost),
    and a "type" some branch's values can break (taken where every branch plainly gives values of that type:
    {"type": ["string", "null"], "anyOf": [{"type": "string"}, {"type": "null"}]})."""
    combinator = next((k for k in _COMBINATORS if k in node), None)
    if combinator is None:
        return None
    if combinator == "$ref":
        branches = [_local_target(node["$ref"], root)]
    else:
        branches = node[combinator] if isinstance(node[combinator], list) else []
    if dropped := next((k for k in _REPLACED_BESIDE_COMBINATOR
                        if k in node and not all(isinstance(b, dict) and k in b for b in branches)), None):
        return (f"{dropped!r} beside {combinator!r} (xgrammar keeps only what {combinator!r} gives: put it in each "
                "branch)")
    if not types:
        return None
    allowed = types | ({"integer"} if "number" in types else set())
    for branch in branches:
        given = _replaced_types(branch, root)
        if not given or not given <= allowed:
            return (f"'type' beside {combinator!r}, whose schemas may take other types (xgrammar keeps only what "
                    f"{combinator!r} gives: give the type in each branch)")
    return None


_ALL_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "array", "object"})
_BARE_KEYS = frozenset({"type", "title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                        "writeOnly"})
"""A branch of only these keys takes every value of its types (all without a type)."""


def _branch_value_types(branch: Any) -> set[str]:
    """Types some value of `branch` has, where plain to see: its listed values' (enum / const, no $ref), else its
    "type" (without the integers of "number": one may have none); empty where unknown."""
    if not isinstance(branch, dict):
        return set()
    literal = next((k for k in _LITERALS if k in branch), None)
    if literal and "$ref" not in branch:
        values = [branch["const"]] if literal == "const" else branch["enum"]
        return set().union(*map(_json_types, values)) if isinstance(values, list) else set()
    return _types(branch)


def _overlapping_one_of(node: dict) -> str | None:
    """oneOf branches that provably overlap: one of only a type (or none) and another with values of that type (an
    integer is a number). xgrammar compiles a oneOf it cannot prove disjoint as anyOf (it logs a warning, also for
    disjoint ones: a discriminated union, [array, object]), so a value both take could come out: refused where this
    proves the overlap, taken otherwise."""
    branches = node.get("oneOf")
    if not isinstance(branches, list):
        return None
    for i, bare in enumerate(branches):
        if not isinstance(bare, dict) or not set(bare) <= _BARE_KEYS:
            continue
        covers = _types(bare) if "type" in bare else set(_ALL_TYPES)
        covers |= {"integer"} if "number" in covers else set()
        for j, other in enumerate(branches):
            if j != i and (shared := sorted(covers & _branch_value_types(other))):
                return (f"'oneOf' branches {min(i, j)} and {max(i, j)} both taking {shared[0]!r} values (xgrammar "
                        "then lets either through, as 'anyOf' does: use 'anyOf', or make the branches exclusive)")
    return None


_DATA_KEYWORDS = frozenset({"default", "enum", "const", "examples"})
"""Keywords whose values are data, not schemas: not searched (a default may look like a schema)."""
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"})
"""Keywords whose values map names to schemas (a property may be named "type" or "format")."""


def _types(node: dict) -> set[str]:
    """A schema's "type" as a set of names: a name, or a list of them (["string", "null"])."""
    given = node.get("type")
    if isinstance(given, str):
        return {given}
    return {t for t in given if isinstance(t, str)} if isinstance(given, list) else set()


_KIND_NAMES = {"json": "JSON schema", "regex": "regex", "grammar": "grammar", "structural_tag": "structural tag"}
"""What an error calls each kind of grammar key."""


def _check_enforced(kind: str, text: str) -> None:
    """StructuredOutputError where a JSON schema of the key (a structural tag's too: `tag_schemas`) uses a keyword
    xgrammar would ignore (`unenforced_schema_feature`), so that no answer breaks its schema unseen."""
    if kind == "json":
        schemas = [json.loads(text)]
    elif kind == "structural_tag":
        try:
            schemas = tag_schemas(json.loads(text))
        except ValueError:
            return  # (not JSON: compiling it says so)
    else:
        return
    for schema in schemas:
        if feature := unenforced_schema_feature(schema):
            raise StructuredOutputError(f"structured output: the JSON schema uses {feature}, which xgrammar (the "
                                        "grammar backend here) does not enforce, so answers could break it: "
                                        "remove it, or check that rule after")


def tag_schemas(tag: Any) -> list[Any]:
    """The JSON schemas a structural tag holds: the older form's structures' "schema"s, and in xgrammar's format
    every {"type": "json_schema", "json_schema": ...} at any depth."""
    found, stack = [], [tag]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get("type") == "json_schema" and "json_schema" in node:
                found.append(node["json_schema"])
            elif "begin" in node and "end" in node and "schema" in node:  # (an older form's structure)
                found.append(node["schema"])
            else:
                stack.extend(node.values())
    return found


def unenforced_schema_feature(schema: Any) -> str | None:
    """The first keyword of `schema` (a JSON schema, any depth) that xgrammar would ignore, as "'uniqueItems' (in
    properties.tags)"; None where it enforces all of them. Iterative: a schema may nest as deep as JSON allows."""
    stack: list[tuple[str, Any]] = [("", schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        where, types = f" (in {path})" if path else "", _types(node)
        known = types or _inferred_types(node)  # (no type known at all: any value, so those keywords go unenforced)
        untyped = not known and not any(k in node for k in _TYPE_GIVERS)
        for kinds, keywords in _UNENFORCED:
            if (untyped or known & kinds) and (found := next((k for k in keywords if k in node), None)):
                return f"{found!r}{where}"
        if found := _unenforced_combination(node, types, known, schema):
            return f"{found}{where}"
        if "string" in types and "format" in node and (not isinstance(node["format"], str)
                                                        or node["format"] not in _XGRAMMAR_FORMATS):
            return f"the string format {str(node['format'])[:40]!r}{where}"
        for key, value in node.items():
            inner = f"{path}.{key}" if path else str(key)
            if key in _DATA_KEYWORDS:
                continue
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                stack.extend((f"{inner}.{name}", item) for name, item in value.items())
            elif key == "propertyNames":
                continue  # (a key's schema: a string's, with or without its type; checked with its object)
            elif isinstance(value, dict):
                stack.append((inner, value))
            elif isinstance(value, list):
                stack.extend((f"{inner}[{i}]", item) for i, item in enumerate(value))
    return None


class GrammarState:
    """One request's matcher and how many of its outputs it has accepted. The runner keeps one per request to mask
    its logits (`advance`, `fill`); the facade keeps another to check each token the request gets (`refusal`)."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self.num_accepted = 0
        self.broken = False
        """Set once the matcher refused a token: the grammar allowed none (no string completes it), the row was
        unmasked and the sampler's token broke it. The runner then masks nothing more; the facade's own state has
        refused the same token and ends the request with an error (`refusal`)."""

    def advance(self, outputs: list[int]) -> None:
        """Accept the outputs not yet accepted (none after the grammar ended: `fill`)."""
        while self.num_accepted < len(outputs):
            token = outputs[self.num_accepted]
            self.num_accepted += 1
            if self.broken or self.matcher.is_terminated():  # (ignore_eos: the answer goes on past its end)
                continue
            if not self.matcher.accept_token(token):
                logger.debug("structured output: the grammar refused token %d; no more masks for its request", token)
                self.broken = True

    def refusal(self, token: int) -> str | None:
        """Accept the request's next output `token`; None where the grammar takes it (or has ended: ignore_eos),
        else why not, once (the state is broken then and takes anything after). Refused only where the grammar
        allowed no token at all (a grammar no string completes from where it stands: `root ::= "a" | "b" c` with
        `c ::= c "x"` once "b" came), as the mask allows only what the matcher accepts. (One that allows no first
        token, a regex like [^\\s\\S], is refused when compiled.)"""
        if self.broken or self.matcher.is_terminated():
            return None
        if self.matcher.accept_token(token):
            self.num_accepted += 1
            return None
        self.broken = True
        tokens = f"{self.num_accepted} token{'' if self.num_accepted == 1 else 's'}"
        if not self.allows_a_token():  # (the refused token left the matcher where it was)
            return (f"structured output: after {tokens} the grammar allows no next token (no string completes it "
                    "from there: a rule that never ends), so the request ended with an error")
        return f"structured output: the grammar refused token {token} after {tokens}"

    def allows_a_token(self) -> bool:
        """Whether the matcher, where it stands, allows some next token (its stop token counts)."""
        bitmask = _import_xgrammar().allocate_token_bitmask(1, self.vocab_size)
        self.matcher.fill_next_token_bitmask(bitmask, 0)
        return bool(bitmask.any())

    def fill(self, bitmask, row: int) -> bool:
        """Write the allowed next tokens into `bitmask[row]`; False if unconstrained: broken, or ended (the grammar
        took its stop token and the request goes on, as with ignore_eos: vLLM leaves such a row unmasked too)."""
        if self.broken or self.matcher.is_terminated():
            return False
        self.matcher.fill_next_token_bitmask(bitmask, row)
        return True
