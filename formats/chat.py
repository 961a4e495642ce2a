"""Chat prompts: Kimi K2's own chat template, and a checkpoint's Jinja template rendered in a sandbox.

Contract:
- `K2_CHAT_TEMPLATE` is a Jinja chat template for Kimi K2's format, following the real K2-Thinking
  template's rules (k2quant's own text). Turns are `<|im_{role}|>{name}<|im_middle|>{content}<|im_end|>`,
  with no newlines between them; tools are declared first in a `tool_declare` system turn (compact JSON,
  keys in the order given); the default system prompt follows when the first message is not a system
  one; an assistant turn is `<think>{reasoning}</think>{content}` and then its tool calls
  (`<|tool_calls_section_begin|><|tool_call_begin|>ID<|tool_call_argument_begin|>ARGS<|tool_call_end|>
  ...<|tool_calls_section_end|>`, arguments verbatim when a string, else JSON); a tool result is a
  system-style turn `## Return of {tool_call_id}\\n{content}`; content is a string or a list of
  OpenAI text parts. Reasoning: as K2-Thinking's template splits the conversation, the messages up to
  and including the last assistant message without tool calls are history, whose assistant turns
  get an empty `<think></think>`; assistant turns after it (the tool-calling steps of the turn in
  progress) keep their `reasoning_content`. It contains `<|im_assistant|>assistant<|im_middle|>`
  literally: llama.cpp recognizes Kimi K2's template by that text.
- `render_chat(messages, tools, add_generation_prompt)` renders exactly the text `K2_CHAT_TEMPLATE`
  renders for the same messages, in plain Python (no Jinja); `k2quant.formats.tokenizer` re-exports it.
- `ChatTemplate.load(model_dir)` takes a checkpoint's template as transformers does: the
  `chat_template.jinja` file if there is one, else `tokenizer_config.json`'s `chat_template` (a string,
  or a list of {name, template}: "default", and "tool_use" when tools are given), else the built-in
  K2 format (`render_chat`). `render(...)` renders it as transformers' `apply_chat_template(...,
  tokenize=False)` does: the same Jinja options (trim_blocks, lstrip_blocks, loopcontrols), the same
  `tojson` filter and `raise_exception` / `strftime_now` globals, messages reduced to plain JSON data
  with None-valued keys dropped and `reasoning` / `thinking` aliased to `reasoning_content`, and the
  named special tokens (bos_token, eos_token, ...) of tokenizer_config.json as variables.
- A template is code from the checkpoint: it runs in jinja2's ImmutableSandboxedEnvironment, with no
  way to load files (`{% include %}`, `{% import %}`, `{% extends %}` are refused), and every failure
  (syntax error at load, sandbox violation, `raise_exception`, undefined value, any other error while
  rendering) is one `ChatTemplateError` naming the template's file and the problem (the server's 400).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from k2quant.errors import K2QuantError

CONFIG_FILE = "tokenizer_config.json"
JINJA_FILE = "chat_template.jinja"
BUILTIN = "<built-in K2 chat format>"
DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
# the named special tokens transformers passes to every chat template (PreTrainedTokenizerBase.special_tokens_map)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# the names a message's reasoning arrives under; templates read the first (transformers aliases them likewise)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
MAX_TEMPLATE_CHARS = 1 << 20  # K2's own template is 2.5 kB; the longest templates models ship are tens of kB
_TEXT_PARTS_ONLY = 'message content must be a string or a list of {"type": "text", "text": ...} parts'

K2_CHAT_TEMPLATE = r"""{#- Kimi K2 chat format with K2-Thinking's reasoning rules, written for k2quant;
    k2quant.formats.chat.render_chat renders the same text in Python. -#}
{%- macro k2_content(c) -%}
  {%- if c is string -%}
    {{- c -}}
  {%- elif c is not none -%}
    {%- for part in c -%}
      {%- if part is mapping and part['type'] == 'text' -%}
        {{- part['text'] -}}
      {%- else -%}
        {{- raise_exception('message content must be a string or a list of {"type": "text", "text": ...} parts') -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{#- history: up to the last assistant message without tool calls; its assistant turns drop their reasoning -#}
{%- set k2 = namespace(history_end=0) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'assistant' and not m.get('tool_calls') -%}
    {%- set k2.history_end = loop.index -%}
  {%- endif -%}
{%- endfor -%}
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}
  <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}
{%- for m in messages -%}
  {%- set name = m.get('name') or m['role'] -%}
  {%- if m['role'] == 'user' -%}
    <|im_user|>{{ name }}<|im_middle|>{{ k2_content(m.get('content')) }}<|im_end|>
  {%- elif m['role'] == 'assistant' -%}
    <|im_assistant|>{{ name }}<|im_middle|><think>
    {%- if loop.index0 >= k2.history_end -%}
      {{- m.get('reasoning_content') or '' -}}
    {%- endif -%}
    </think>{{ k2_content(m.get('content')) }}
    {%- if m.get('tool_calls') -%}
      <|tool_calls_section_begin|>
      {%- for call in m['tool_calls'] -%}
        <|tool_call_begin|>{{ call['id'] }}<|tool_call_argument_begin|>
        {%- if call['function']['arguments'] is string -%}
          {{- call['function']['arguments'] -}}
        {%- else -%}
          {{- call['function']['arguments'] | tojson -}}
        {%- endif -%}
        <|tool_call_end|>
      {%- endfor -%}
      <|tool_calls_section_end|>
    {%- endif -%}
    <|im_end|>
  {%- elif m['role'] == 'tool' -%}
    <|im_system|>{{ name }}<|im_middle|>## Return of {{ m.get('tool_call_id', '') }}{{ '\n' }}
    {{- k2_content(m.get('content')) }}<|im_end|>
  {%- else -%}
    <|im_system|>{{ name }}<|im_middle|>{{ k2_content(m.get('content')) }}<|im_end|>
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""


class ChatTemplateError(K2QuantError):
    """A chat template could not be loaded or rendered; names the template's file and the problem."""

    def __init__(self, file: str, problem: str):
        super().__init__(f"{file}: {problem}")
        self.file = file
        self.problem = problem


# ---------------------------------------------------------------------------- the sandbox
class _TemplateRaised(jinja2.TemplateError):
    """raise_exception(message) called by the template."""


class _FileAccessRefused(jinja2.TemplateError):
    """The template tried to include, import or extend another template."""


class _NoFiles(jinja2.BaseLoader):
    """The environment's loader: every template name is refused, so a template reaches no file."""

    def get_source(self, environment: jinja2.Environment, template: str):
        raise _FileAccessRefused(
            f"chat templates may not include, import or extend other templates (asked for {template!r})"
        )


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    """transformers' tojson: plain json.dumps (no HTML escaping, non-ASCII kept), with its options exposed."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict` for templates: builds plain dicts, but exposes no type to climb from (as transformers does)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


class _Namespace(jinja2.utils.Namespace):
    """`namespace` for templates: attribute names starting with an underscore are refused."""

    def __init__(*args: Any, **kwargs: Any):  # jinja's signature trick: `self` may be a key
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with an underscore ({name!r})")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The one environment every chat template compiles in: transformers' options, no loader of files."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], loader=_NoFiles()
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env


def _template_line(exc: BaseException) -> int | None:
    """The template line a rendering error happened on (jinja rewrites tracebacks to name it)."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _render_error(file: str, exc: Exception) -> ChatTemplateError:
    line = _template_line(exc)
    at = f" (template line {line})" if line else ""
    if isinstance(exc, _TemplateRaised):
        return ChatTemplateError(file, f"the chat template refused the conversation{at}: {exc}")
    if isinstance(exc, _FileAccessRefused):
        return ChatTemplateError(file, f"{exc}{at}")
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return ChatTemplateError(file, f"the chat template did something the sandbox forbids{at}: {exc}")
    if isinstance(exc, jinja2.exceptions.UndefinedError):
        return ChatTemplateError(file, f"the chat template used an undefined value{at}: {exc}")
    return ChatTemplateError(file, f"the chat template failed{at}: {type(exc).__name__}: {exc}")


def _compile(source: str, file: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(file, f"chat template syntax error on line {e.lineno}: {e.message}") from None
    except Exception as e:  # whatever a checkpoint's template does: one clear error
        raise ChatTemplateError(file, f"chat template does not compile: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------- inputs
def _plain(value: Any) -> Any:
    """Plain JSON data for a template: str, int, float, bool, None, dicts, lists, tuples. Dataclasses and
    pydantic models become dicts; anything else becomes a placeholder naming its type, so a template
    never holds an object whose methods the sandbox does not know (as transformers does)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def prepare_messages(messages: Sequence[Mapping[str, Any]], file: str = BUILTIN) -> list[dict[str, Any]]:
    """Messages as a chat template sees them (what transformers' apply_chat_template hands its template):
    plain JSON data, keys whose value is None dropped, the reasoning under every name in REASONING_FIELDS
    (`reasoning_content` from `reasoning` or `thinking` when it is missing)."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise ChatTemplateError(file, f"messages must be a list of message objects, not {type(messages).__name__}")
    out = []
    for i, message in enumerate(_plain(list(messages))):
        if not isinstance(message, dict):
            raise ChatTemplateError(file, f"message {i} is not an object ({type(message).__name__})")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# ---------------------------------------------------------------------------- the built-in format
def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """K2's chat format in plain Python: the text K2_CHAT_TEMPLATE renders for the same messages
    (see the module docstring for the format). Raises ChatTemplateError on content that is neither a
    string nor text parts, and on a tool call without function arguments."""
    msgs = prepare_messages(messages, BUILTIN)
    tools = _plain(tools)
    out = []
    if tools:
        out.append(f"<|im_system|>tool_declare<|im_middle|>{_tojson(tools, separators=(',', ':'))}<|im_end|>")
    if not msgs or msgs[0].get("role") != "system":
        out.append(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>")
    history_end = 0
    for i, m in enumerate(msgs):
        if m.get("role") == "assistant" and not m.get("tool_calls"):
            history_end = i + 1
    for i, m in enumerate(msgs):
        role = m.get("role", "")
        name = str(m.get("name") or role)
        content = _content(m.get("content"))
        if role == "user":
            out.append(f"<|im_user|>{name}<|im_middle|>{content}<|im_end|>")
        elif role == "assistant":
            reasoning = str(m.get("reasoning_content") or "") if i >= history_end else ""
            calls = _tool_calls(m["tool_calls"]) if m.get("tool_calls") else ""
            out.append(f"<|im_assistant|>{name}<|im_middle|><think>{reasoning}</think>{content}{calls}<|im_end|>")
        elif role == "tool":
            call_id = str(m.get("tool_call_id", ""))
            out.append(f"<|im_system|>{name}<|im_middle|>## Return of {call_id}\n{content}<|im_end|>")
        else:
            out.append(f"<|im_system|>{name}<|im_middle|>{content}<|im_end|>")
    if add_generation_prompt:
        out.append("<|im_assistant|>assistant<|im_middle|>")
    return "".join(out)


def _content(c: Any) -> str:
    if isinstance(c, str):
        return c
    if c is None:
        return ""
    if not isinstance(c, list | tuple):
        raise ChatTemplateError(BUILTIN, _TEXT_PARTS_ONLY)
    parts = []
    for part in c:
        if not (isinstance(part, Mapping) and part.get("type") == "text"):
            raise ChatTemplateError(BUILTIN, _TEXT_PARTS_ONLY)
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _tool_calls(calls: Any) -> str:
    if not isinstance(calls, list | tuple):
        raise ChatTemplateError(BUILTIN, f"tool_calls must be a list, not {type(calls).__name__}")
    out = ["<|tool_calls_section_begin|>"]
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or "arguments" not in fn:
            raise ChatTemplateError(BUILTIN, f"tool call {i} has no function arguments")
        args = fn["arguments"]
        args = args if isinstance(args, str) else _tojson(args)
        out.append(f"<|tool_call_begin|>{call.get('id', '')}<|tool_call_argument_begin|>{args}<|tool_call_end|>")
    out.append("<|tool_calls_section_end|>")
    return "".join(out)


# ---------------------------------------------------------------------------- a checkpoint's template
@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template, compiled in the sandbox; no templates means the built-in K2 format.

    `file` is where the template came from (named in every error); `templates` maps a template name
    ("default", maybe "tool_use") to its Jinja source; `special_tokens` are the named special tokens
    (bos_token, ...) of tokenizer_config.json, given to the template as variables."""

    file: str
    templates: Mapping[str, str] = field(default_factory=dict)
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    _compiled: Mapping[str, jinja2.Template] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.templates and "default" not in self.templates:
            raise ChatTemplateError(
                self.file, f"chat templates {sorted(self.templates)} name none 'default': which to use is unclear"
            )
        compiled = {}
        for name, source in self.templates.items():
            where = self.file if name == "default" else f"{self.file} (chat template {name!r})"
            if not isinstance(source, str):
                raise ChatTemplateError(where, f"chat template is a {type(source).__name__}, not a string")
            if len(source) > MAX_TEMPLATE_CHARS:  # jinja compiles about 100 kB a second: 100 MB would be minutes
                raise ChatTemplateError(where, f"chat template is {len(source)} characters, more than the "
                                               f"{MAX_TEMPLATE_CHARS} k2quant compiles")  # fmt: skip
            compiled[name] = _compile(source, where)
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def from_string(
        cls, source: str, file: str = "<string>", special_tokens: Mapping[str, str] | None = None
    ) -> ChatTemplate:
        """A template given as text (`file` names it in errors)."""
        return cls(file, {"default": source}, dict(special_tokens or {}))

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatTemplate:
        """The chat template of the model in `model_dir`, found as transformers finds it: chat_template.jinja,
        else tokenizer_config.json's chat_template; neither: the built-in K2 format (render_chat)."""
        d = Path(model_dir)
        if not d.is_dir():
            raise ChatTemplateError(str(d), "not a model directory")
        cfg_path = d / CONFIG_FILE
        cfg: dict[str, Any] = {}
        if cfg_path.is_file():
            try:
                loaded = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ChatTemplateError(str(cfg_path), f"not valid JSON ({e})") from None
            if not isinstance(loaded, dict):
                raise ChatTemplateError(str(cfg_path), "not a JSON object")
            cfg = loaded
        special = _special_tokens(cfg)
        jinja_path = d / JINJA_FILE
        if jinja_path.is_file():
            try:
                source = jinja_path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ChatTemplateError(str(jinja_path), f"not UTF-8 text ({e})") from None
            return cls(str(jinja_path), {"default": source}, special)
        value = cfg.get("chat_template")
        if value is None or value == "":
            return cls(BUILTIN, {}, special)
        if isinstance(value, str):
            return cls(str(cfg_path), {"default": value}, special)
        if isinstance(value, list):
            named = {}
            for i, entry in enumerate(value):
                if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and "template" in entry):
                    raise ChatTemplateError(str(cfg_path), f"chat_template[{i}] is not a {{name, template}} object")
                named[entry["name"]] = entry["template"]
            return cls(str(cfg_path), named, special)
        raise ChatTemplateError(str(cfg_path), f"chat_template is a {type(value).__name__}, not a string or a list")

    @property
    def builtin(self) -> bool:
        """True when the model has no template of its own and render_chat's K2 format is used."""
        return not self.templates

    @property
    def source(self) -> str | None:
        """The default template's Jinja text (None for the built-in format)."""
        return self.templates.get("default")

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (OpenAI chat messages) and `tools` (OpenAI tool schemas).
        `template_kwargs` become template variables (e.g. a template's `thinking` switch); the built-in
        format has none. Any failure is a ChatTemplateError naming the template's file."""
        msgs = prepare_messages(messages, self.file)
        if self.builtin:
            return render_chat(msgs, tools, add_generation_prompt)
        name = "tool_use" if tools is not None and "tool_use" in self._compiled else "default"
        context = {"documents": None, **self.special_tokens, **_plain(template_kwargs)}
        context.update(messages=msgs, tools=_plain(tools), add_generation_prompt=add_generation_prompt)
        where = self.file if name == "default" else f"{self.file} (chat template {name!r})"
        try:
            text = self._compiled[name].render(context)
        except Exception as e:  # a checkpoint's template may fail in any way: one clear error
            raise _render_error(where, e) from None
        return text


def _special_tokens(cfg: Mapping[str, Any]) -> dict[str, str]:
    """tokenizer_config.json's named special tokens as text (an AddedToken entry gives its content)."""
    out = {}
    for key in SPECIAL_TOKEN_NAMES:
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            out[key] = v
    return out
