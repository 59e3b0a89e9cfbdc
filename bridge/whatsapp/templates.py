"""Approved templates staff may send (`whatsapp.templates`): the pure part.

Parses `!plantilla` commands, checks parameter values before anything is queued,
renders the text the citizen will read (for the notice in the room) and builds the
`template` object of Meta's send request:
`{name, language: {code}, components: [{type: body, parameters: [{type: text,
parameter_name?, text}]}]}`. No I/O here: bridge.whatsapp.staff_templates does it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from bridge.config import TemplateConfig
from bridge.errors import InvalidParam, NotFound
from bridge.privacy import looks_like_personal_id
from bridge.texts.matrix import default as mx_text

COMMAND: Final = "!plantilla"
# Meta accepts a text parameter of up to 1,024 characters when the template has other
# components besides the body (32,768 with the body alone): the smaller one is safe.
MAX_PARAMETER: Final = 1024
# Graph refuses (132018) parameter text with a newline or tab, or more than four
# consecutive spaces.
_BAD_SPACING: Final = re.compile(r"[\n\r\t]| {5,}")
_PLACEHOLDER: Final = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")


class TemplateProblem(InvalidParam):
    """A template request that cannot be sent; `message` is a Spanish text for staff."""


class UnknownTemplate(NotFound):
    """No approved template has that name."""


@dataclass(frozen=True)
class TemplateCommand:
    """`!plantilla` (list) or `!plantilla NAME args…` (send)."""

    name: str | None
    args: str


def parse_command(body: str) -> TemplateCommand | None:
    """The command in a staff message, or None if the message is not one."""
    text = body.strip()
    head, _, rest = text.partition(" ")
    if head.lower() != COMMAND:
        return None
    name, _, args = rest.strip().partition(" ")
    return TemplateCommand(name.strip().lower() or None, args.strip())


def find(templates: Sequence[TemplateConfig], name: str) -> TemplateConfig:
    for template in templates:
        if template.name == name:
            return template
    raise UnknownTemplate(mx_text.TEMPLATE_UNKNOWN.format(name=name[:60], command=COMMAND))


def usage(template: TemplateConfig) -> str:
    if not template.parameters:
        return f"{COMMAND} {template.name}"
    if template.parameter_format == "named":
        return f"{COMMAND} {template.name} " + " ".join(f"{p}=…" for p in template.parameters)
    return f"{COMMAND} {template.name} " + " ".join(
        mx_text.TEMPLATE_USAGE_VALUE.format(name=p) for p in template.parameters)


def listing(templates: Sequence[TemplateConfig]) -> str:
    """The notice `!plantilla` answers with."""
    if not templates:
        return mx_text.TEMPLATES_NONE
    lines = [mx_text.TEMPLATES_HEADER]
    for t in templates:
        lines.append(mx_text.TEMPLATES_ITEM.format(name=t.name, category=t.category,
                                                   language=t.language,
                                                   description=t.description))
        lines.append(mx_text.TEMPLATES_ITEM_TEXT.format(body=t.body))
        lines.append(mx_text.TEMPLATES_ITEM_USAGE.format(usage=usage(t)))
    lines.append(mx_text.TEMPLATES_FOOTER)
    return "\n".join(lines)


def parse_args(template: TemplateConfig, args: str) -> dict[str, str]:
    """Parameter values from the text after the template's name: `name=value …` (a value
    runs to the next `name=`) or positional values (quoted when they hold spaces; with a
    single parameter the whole text is its value)."""
    names = template.parameters
    if not names:
        if args:
            raise TemplateProblem(mx_text.TEMPLATE_TAKES_NO_VALUES.format(
                name=template.name, usage=usage(template)))
        return {}
    marker = re.compile(r"(?:^|\s)(" + "|".join(map(re.escape, names)) + r")=")
    matches = list(marker.finditer(args))
    if matches and matches[0].start() == 0:
        values: dict[str, str] = {}
        for match, nxt in zip(matches, [*matches[1:], None], strict=True):
            end = nxt.start() if nxt else len(args)
            if match.group(1) in values:
                raise TemplateProblem(mx_text.TEMPLATE_VALUE_TWICE.format(name=match.group(1)))
            values[match.group(1)] = args[match.end():end].strip()
        return values
    if len(names) == 1:
        return {names[0]: args.strip().strip("\"'«»").strip()}
    try:
        parts = shlex.split(args)
    except ValueError:
        raise TemplateProblem(mx_text.TEMPLATE_UNCLOSED_QUOTE.format(
            usage=usage(template))) from None
    if len(parts) != len(names):
        raise TemplateProblem(mx_text.TEMPLATE_VALUE_COUNT.format(
            name=template.name, needed=len(names), given=len(parts), usage=usage(template)))
    return dict(zip(names, parts, strict=True))


def from_api(template: TemplateConfig, parameters: Any) -> dict[str, str]:
    """Parameter values from the admin API: an object by name or a list in order."""
    if parameters is None:
        parameters = {}
    if isinstance(parameters, list):
        if len(parameters) != len(template.parameters):
            raise TemplateProblem(f"parameters: the template needs {len(template.parameters)} "
                                  f"values ({', '.join(template.parameters) or 'none'})")
        parameters = dict(zip(template.parameters, parameters, strict=True))
    if not isinstance(parameters, dict):
        raise TemplateProblem("parameters: must be an object (by name) or a list (in order)")
    if not all(isinstance(v, str) for v in parameters.values()):
        raise TemplateProblem("parameters: every value must be a string")
    return {str(k): v for k, v in parameters.items()}


def check(template: TemplateConfig, values: Mapping[str, str]) -> dict[str, str]:
    """The values in the template's order, refused (TemplateProblem, a Spanish message
    that never repeats a value) when one is missing, unknown, empty, too long, spaced as
    Graph refuses, or looks like a phone number, DNI/NIE, IBAN or card number."""
    unknown = sorted(set(values) - set(template.parameters))
    if unknown:
        raise TemplateProblem(mx_text.TEMPLATE_UNKNOWN_VALUE.format(
            name=unknown[0][:40], usage=usage(template)))
    missing = [p for p in template.parameters if not values.get(p, "").strip()]
    if missing:
        raise TemplateProblem(mx_text.TEMPLATE_MISSING_VALUES.format(
            names=", ".join(missing), usage=usage(template)))
    checked = {}
    for name in template.parameters:
        value = values[name].strip()
        if len(value) > MAX_PARAMETER:
            raise TemplateProblem(mx_text.TEMPLATE_VALUE_TOO_LONG.format(
                name=name, max=MAX_PARAMETER))
        if _BAD_SPACING.search(value):
            raise TemplateProblem(mx_text.TEMPLATE_VALUE_SPACING.format(name=name))
        kinds = looks_like_personal_id(value)
        if kinds:
            raise TemplateProblem(mx_text.TEMPLATE_VALUE_PERSONAL.format(
                name=name, kinds=", ".join(kinds)))
        checked[name] = value
    return checked


def render(template: TemplateConfig, values: Mapping[str, str]) -> str:
    """The body as the citizen reads it."""
    if template.parameter_format == "named":
        return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template.body)
    ordered = [values[p] for p in template.parameters]
    return _PLACEHOLDER.sub(lambda m: ordered[int(m.group(1)) - 1], template.body)


def payload(template: TemplateConfig, values: Mapping[str, str]) -> dict[str, Any]:
    """The outbox payload (type `template`) of a checked send."""
    parameters: list[dict[str, str]] = []
    for name in template.parameters:
        parameter = {"type": "text", "text": values[name]}
        if template.parameter_format == "named":
            parameter = {"type": "text", "parameter_name": name, "text": values[name]}
        parameters.append(parameter)
    components = [{"type": "body", "parameters": parameters}] if parameters else []
    return {"type": "template", "name": template.name, "language": template.language,
            "components": components}
