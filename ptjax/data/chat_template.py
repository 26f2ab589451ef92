"""Render a model's Jinja chat template the way Hugging Face transformers does, inside a sandbox.

A chat template ships with the model folder, so it is untrusted code. It runs only in jinja2's
`ImmutableSandboxedEnvironment` (no attribute starting with `_`, no mutation of the inputs), sees
only plain JSON data, and gets the same small set of helpers transformers gives it
(`raise_exception`, `strftime_now`, a `tojson` filter that keeps non-ASCII text, `{% generation %}`
blocks), with the same whitespace rules (`trim_blocks`, `lstrip_blocks`), so a conversation renders
to the same string the model was trained on.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    Some templates mark assistant text with this tag for transformers' assistant-token mask; ptjax
    locates assistant turns by rendering prefixes instead, so the tag only has to parse.
    """

    tags = {"generation"}

    def parse(self, parser):
        """The block as a call of `_body` on its contents (jinja's hook for a custom tag)."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateRaised(Exception):
    """A template called `raise_exception(message)`: it rejects the conversation on purpose."""


def _raise_exception(message):
    """Template helper: stop rendering with the template's own message ('roles must alternate')."""
    raise _TemplateRaised(str(message))


def _strftime_now(fmt):
    """Template helper: the current date and time formatted by the template (Llama 3.1's system)."""
    return datetime.datetime.now().strftime(str(fmt))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """The `tojson` filter as transformers defines it: `json.dumps`, non-ASCII kept, no escaping.

    Jinja's built-in `tojson` escapes `<`, `>`, `&` and `'` for HTML, which would change the text a
    tool-calling template shows the model.
    """
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _DictBuilder:
    """The template's `dict` global: builds dicts, but is not the `dict` type itself.

    With the real type, `dict.update(messages[0], ...)` mutates the inputs through an unbound
    method, which the immutable sandbox only blocks when called on an instance.
    """

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, keys, value=None):
        """`dict.fromkeys`, which some templates call through the global."""
        return dict.fromkeys(keys, value)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()` that refuses attribute names starting with `_`.

    `{% set ns.x = ... %}` writes through `__setitem__`, which the sandbox does not check, so
    without this a template could plant dunder attributes on the object.
    """

    def __init__(*args, **kwargs):  # noqa: N805 (same signature trick as jinja's Namespace)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"namespace attribute {name!r} starts with an underscore")


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """The compiled template, cached: encoding a data set renders one template many times."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictBuilder()
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def _plain(value: Any, where: str) -> Any:
    """A copy of `value` built only from JSON types (str, int, float, bool, None, list, dict).

    Subclasses and other objects carry methods the sandbox cannot judge, so nothing else is passed
    to a template; a value that is not plain data is a caller error named by `where`.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k, f"{where} key"): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: a chat template only receives plain JSON data "
                    f"(str, number, bool, None, list, dict), got {type(value).__name__}")


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    bos_token: str = "",
    eos_token: str = "",
    source: str = "chat template",
    **extra: Any,
) -> str:
    """The text `template` makes of `messages` (a list of `{"role", "content"}` dicts).

    Mirrors transformers' `apply_chat_template(tokenize=False)`: the template sees `messages`,
    `add_generation_prompt`, `bos_token`, `eos_token`, `tools=None`, `documents=None` and any
    `extra` variables. With `add_generation_prompt` the text ends with the header that opens an
    assistant turn, ready for sampling. A syntax error, an error while rendering, an operation the
    sandbox blocks, or the template's own `raise_exception(...)` becomes a ValueError that starts
    with `source`, so the user learns which model folder's template failed.
    """
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{source}: syntax error on line {e.lineno}: {e.message}") from e
    variables = {"tools": None, "documents": None, **extra}
    variables = {name: _plain(value, f"{source}: {name}") for name, value in variables.items()}
    variables["messages"] = _plain(list(messages), f"{source}: messages")
    try:
        return compiled.render(add_generation_prompt=bool(add_generation_prompt),
                               bos_token=str(bos_token), eos_token=str(eos_token), **variables)
    except _TemplateRaised as e:
        raise ValueError(f"{source}: {e}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ValueError(f"{source}: unsafe operation blocked by the sandbox ({e})") from None
    except Exception as e:  # everything raised here comes from running the template's code
        raise ValueError(f"{source}: rendering failed ({type(e).__name__}: {e})") from e
