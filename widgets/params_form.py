"""ParamsForm: a submit form generated from a task's pydantic JSON schema.

Strings, integers and floats get an Input, booleans a Switch (or, where empty
means something -- null, or a default the schema does not state -- a Select of
true and false that may stay blank), string enums a Select, and everything else (lists, dicts, nested models via ``$ref``,
unions) a JSON text field. A union with a string in it (``int | str``) takes
plain text: what reads as one of its other members is that (``5``), anything
else is the string (``hello``; ``"5"`` quoted for the string 5). Numbers must
be finite: JSON, and so the engine, cannot carry nan or infinity. Each field
shows its description and limits
(``1 ≤ value ≤ 100``, ``at most 20 characters``), which ``collect()`` checks
along with parsing, so every error the form can know of shows at once.
``collect()`` parses values client-side; the engine still validates them, and
its ``InvalidParams.errors`` can be shown inline with ``show_errors``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from rich.text import Text
from taskwatch.engine import TaskInfo
from textual import on
from textual.app import ComposeResult
from textual.content import Content
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Input, Label, Select, Static, Switch

from ._format import json_text, printable, printable_lines

FieldKind = Literal["str", "int", "float", "bool", "json"]

_SIMPLE_TYPES: dict[str, tuple[FieldKind, str]] = {
    "string": ("str", "string"),
    "integer": ("int", "int"),
    "number": ("float", "float"),
    "boolean": ("bool", "bool"),
    "array": ("json", "list (JSON)"),
    "object": ("json", "dict (JSON)"),
}

_EXAMPLES = {"array": '["a", "b"]', "object": '{"key": "value"}'}
_LIMIT_KEYS = (
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class ParamsFormError(ValueError):
    """Some fields could not be parsed; ``errors`` are pydantic-style dicts (loc, msg, type)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '(params)'}: {e['msg']}" for e in errors]
        super().__init__("invalid params:\n" + "\n".join(lines))


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One form field, derived from one property of the params schema."""

    name: str
    kind: FieldKind
    type_label: str
    required: bool
    nullable: bool
    has_default: bool
    default: Any = None
    description: str = ""
    #: for JSON fields: the JSON type the value must have ("array"/"object"), if known
    json_type: str | None = None
    #: allowed values of a string enum
    choices: tuple[str, ...] = ()
    #: numeric bounds and length or item limits from the schema (JSON schema keywords)
    limits: tuple[tuple[str, float], ...] = ()
    #: a union with a plain string member: text that is none of the other members is the string
    text_fallback: bool = False
    #: with ``text_fallback``: the JSON types of the other members ("integer", "array", ...;
    #: None where any JSON value may do)
    alternatives: tuple[str | None, ...] = ()
    #: a secret (``format: password``, as for pydantic's SecretStr): its schema default is a mask
    secret: bool = False

    def limits_text(self) -> str:
        """The limits as people say them: ``1 ≤ value < 10``, ``at most 20 characters``."""
        words = {
            "minimum": "≥ {}", "maximum": "≤ {}", "exclusiveMinimum": "> {}", "exclusiveMaximum": "< {}",
            "minLength": "at least {} characters", "maxLength": "at most {} characters",
            "minItems": "at least {} items", "maxItems": "at most {} items",
        }
        return ", ".join(words[key].format(_num(value)) for key, value in self.limits if key in words)

    @property
    def label(self) -> str:
        return f"{self.name}: {self.type_label}{' *' if self.required else ''}"


def fields_from_schema(schema: Mapping[str, Any]) -> list[FieldSpec]:
    """The fields of an object JSON schema, in declaration order."""
    defs: Mapping[str, Any] = schema.get("$defs") or schema.get("definitions") or {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and "properties" not in schema:
        # a model that refers to itself (a tree's children) is all in $defs, its top a reference
        target = defs.get(ref.rsplit("/", 1)[-1])
        if isinstance(target, Mapping):
            schema = target
    required = set(schema.get("required") or ())
    return [
        _field(name, prop if isinstance(prop, Mapping) else {}, name in required, defs)
        for name, prop in (schema.get("properties") or {}).items()
    ]


def _field(name: str, prop: Mapping[str, Any], required: bool, defs: Mapping[str, Any]) -> FieldSpec:
    nullable = False
    schema: Mapping[str, Any] = prop
    union = prop.get("anyOf") or prop.get("oneOf")
    if isinstance(union, list):
        options = [s for s in union if isinstance(s, Mapping) and s.get("type") != "null"]
        nullable = len(options) < len(union)
        schema = options[0] if len(options) == 1 else {"anyOf": options}
    elif isinstance(prop.get("type"), list):  # {"type": ["string", "null"]}
        types = [t for t in prop["type"] if t != "null"]
        nullable = len(types) < len(prop["type"])
        schema = {**prop, "type": types[0] if len(types) == 1 else types}
    kind, type_label, json_type, choices = _classify(schema, defs)
    text_fallback, alternatives, union_label = _string_union(schema, defs)
    if text_fallback:
        type_label = union_label
    limits = tuple(
        (key, float(schema[key])) for key in _LIMIT_KEYS
        if isinstance(schema.get(key), (int, float)) and not isinstance(schema.get(key), bool)
    )
    if nullable:
        type_label = f"{type_label}, optional"
    return FieldSpec(
        name=name,
        kind=kind,
        type_label=type_label,
        required=required,
        nullable=nullable,
        has_default="default" in prop,
        default=prop.get("default"),
        description=str(prop.get("description") or schema.get("description") or ""),
        json_type=json_type,
        choices=choices,
        limits=limits,
        text_fallback=text_fallback,
        alternatives=alternatives,
        secret=schema.get("format") == "password",
    )


#: the JSON type each simple field kind stands for
_KIND_TYPES: dict[str, str | None] = {"int": "integer", "float": "number", "bool": "boolean"}


def _string_union(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> tuple[bool, tuple[str | None, ...], str]:
    """For a union with a plain string member: True, the other members' JSON types and a
    label naming every member; else ``(False, (), "")``."""
    members = schema.get("anyOf")
    if not isinstance(members, list):
        return False, (), ""
    has_text = False
    alternatives: list[str | None] = []
    labels: list[str] = []
    for member in members:
        kind, label, json_type, choices = _classify(member, defs)
        if kind == "str":
            has_text = has_text or not choices  # a string enum is a string too, but not any text
            if not choices and "string" in labels:
                continue
            labels.append("string" if not choices else label)
            continue
        alternatives.append(_KIND_TYPES[kind] if kind in _KIND_TYPES else json_type)
        labels.append(label)
    if not has_text:
        return False, (), ""
    return True, tuple(alternatives), " or ".join(labels)


def _classify(
    schema: Mapping[str, Any], defs: Mapping[str, Any]
) -> tuple[FieldKind, str, str | None, tuple[str, ...]]:
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], Mapping):
        schema = all_of[0]
    ref = schema.get("$ref")
    if isinstance(ref, str):
        def_name = ref.rsplit("/", 1)[-1]
        target = defs.get(def_name)
        if isinstance(target, Mapping):
            choices = _string_enum(target)
            if choices:
                return "str", f"{def_name} (one of {', '.join(map(_choice_text, choices))})", None, choices
            if target.get("type") == "object":
                return "json", f"{def_name} (JSON)", "object", ()
        return "json", f"{def_name} (JSON)", None, ()
    choices = _string_enum(schema)
    if choices:
        return "str", f"one of {', '.join(map(_choice_text, choices))}", None, choices
    json_type = schema.get("type")
    if isinstance(json_type, str) and json_type in _SIMPLE_TYPES:
        kind, label = _SIMPLE_TYPES[json_type]
        if json_type == "string" and schema.get("format"):
            label = f"string ({schema['format']})"
        return kind, label, (json_type if kind == "json" else None), ()
    return "json", "any (JSON)", None, ()


def _string_enum(schema: Mapping[str, Any]) -> tuple[str, ...]:
    values = schema.get("enum")
    if "const" in schema:
        values = [schema["const"]]
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        return tuple(values)
    return ()


def _initial_text(spec: FieldSpec, value: Any, *, from_run: bool = False) -> tuple[str, bool]:
    """The text a field starts with, and whether it is a string field showing its value as a
    JSON string: one with control characters (drawn escaped, never raw) or, from a run, an
    empty string (a blank field would mean null or the default instead)."""
    if value is None:
        return "", False
    # a string needs quotes where as typed it would draw controls, or read as nothing
    needs_quotes = isinstance(value, str) and (printable(value) != value or (from_run and value == ""))
    if spec.text_fallback and isinstance(value, str):
        try:
            as_typed = _parse(spec, value)
        except ValueError:
            as_typed = None
        # quoted also where the plain text would read as another member ("5" for an int | str);
        # the field reads a JSON string back as that string
        return (value if as_typed == value and not needs_quotes else json_text(value)), False
    if spec.kind == "str" and isinstance(value, str):
        return (json_text(value), True) if needs_quotes else (value, False)
    if spec.kind == "json":
        return json_text(value), False
    # a value of another type than the field's (the task's model changed since the run): never
    # drawn raw; submitted unchanged as the run had it unless edited
    return printable(str(value)), False


class ParamsForm(Widget):
    """The params of one task as a form; ``collect()`` returns a dict for ``submit``.

    The form is as tall as its fields; put it in a VerticalScroll where space is short.
    """

    DEFAULT_CSS = Path(__file__).with_suffix(".tcss").read_text(encoding="utf-8")

    #: the name (for ``field_widget`` and ``field_error``) of the JSON field holding the params
    #: of ``values`` that no field of the schema takes (a model with ``extra="allow"``)
    OTHER_PARAMS = "(other params)"

    class Submitted(Message):
        """Enter was pressed in a field (or :meth:`submit` called) and every field parsed."""

        def __init__(self, form: ParamsForm, params: dict[str, Any]) -> None:
            self.form = form
            self.params = params
            super().__init__()

        @property
        def control(self) -> ParamsForm:
            return self.form

    def __init__(
        self,
        task: TaskInfo,
        *,
        values: Mapping[str, Any] | None = None,
        show_description: bool = False,
        cursor_blink: bool = True,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        """``values`` pre-fills fields (e.g. a failed run's params) instead of the defaults: a
        field left as it was filled submits that value exactly, and values no field takes are
        shown (and submitted) as JSON in a field of their own, ``OTHER_PARAMS``;
        ``show_description`` puts the task's description above the fields;
        ``cursor_blink=False`` keeps pictures of the form stable."""
        super().__init__(name=name, id=id, classes=classes, disabled=disabled)
        self.task_info = task
        self.fields: tuple[FieldSpec, ...] = tuple(fields_from_schema(task.params_schema))
        self._initial = dict(values or {})
        known = {spec.name for spec in self.fields}
        self._other = {key: value for key, value in self._initial.items() if key not in known}
        self._show_description = show_description
        self._cursor_blink = cursor_blink
        self._inputs: dict[str, Input | Switch | Select[str]] = {}
        self._errors: dict[str, Static] = {}
        #: what each field held as filled in (an Input's text, a Switch's state, a Select's pick
        #: or None for none: "" may be a pick): a field still holding it is untouched
        self._filled: dict[str, str | bool | None] = {}
        #: string fields showing their value as a JSON string (see _initial_text)
        self._quoted: set[str] = set()

    def compose(self) -> ComposeResult:
        if self._show_description and self.task_info.description:
            yield Static(printable_lines(self.task_info.description), classes="params-form--description", markup=False)
        if not self.fields:
            yield Static("This task takes no params.", classes="params-form--empty")
        for index, spec in enumerate(self.fields):
            field_id = f"params-field-{index}"
            label = Label(printable(spec.label), classes="params-form--label", markup=False)
            if spec.required:
                label.add_class("-required")
            if spec.description:
                # a tooltip's str is read as markup: "e.g. [/tmp/out]" raised on hover
                label.tooltip = Content(printable_lines(spec.description))
            yield label
            hint = " · ".join(part for part in (spec.description, spec.limits_text()) if part)
            if hint:
                yield Static(printable_lines(hint), classes="params-form--hint", markup=False)
            value = self._initial.get(spec.name, spec.default if spec.has_default else None)
            widget: Input | Switch | Select[str]
            if spec.kind == "bool" and _three_way(spec):
                # a Switch has no "not set": blank here is null, or the task's own default
                picked: dict[str, Any] = {"value": "true" if value else "false"} if isinstance(value, bool) else {}
                self._filled[spec.name] = picked.get("value")
                widget = Select(
                    [("true", "true"), ("false", "false")],
                    **picked,
                    allow_blank=True,
                    prompt=self._placeholder(spec),
                    id=field_id,
                )
            elif spec.kind == "bool":
                widget = Switch(value=bool(value), id=field_id)
                self._filled[spec.name] = bool(value)
            elif spec.choices:
                # a pick from the allowed values, not free text; blank only where empty means something
                chosen: dict[str, Any] = {"value": value} if isinstance(value, str) and value in spec.choices else {}
                self._filled[spec.name] = chosen.get("value")
                widget = Select(
                    # the task's values, drawn as written: never read as markup; "" is a choice
                    # of its own, told apart from the blank entry
                    [(_choice_label(choice), choice) for choice in spec.choices],
                    **chosen,
                    allow_blank=spec.nullable or spec.has_default or not spec.required or value not in spec.choices,
                    prompt=self._placeholder(spec),
                    id=field_id,
                )
            else:
                text, quoted = _initial_text(spec, value, from_run=spec.name in self._initial)
                if quoted:
                    self._quoted.add(spec.name)
                    yield Static(_QUOTED_HINT, classes="params-form--hint", markup=False)
                self._filled[spec.name] = text
                widget = Input(
                    text,
                    placeholder=self._placeholder(spec),
                    type="integer" if spec.kind == "int" else "number" if spec.kind == "float" else "text",
                    id=field_id,
                )
                widget.cursor_blink = self._cursor_blink
            widget.add_class("params-form--input")
            self._inputs[spec.name] = widget
            yield widget
            yield self._error_line(spec.name)
        if self._other:
            yield from self._compose_other()
        general = Static("", id="params-form-general-error", classes="params-form--error", markup=False)
        general.display = False
        yield general

    def _error_line(self, name: str) -> Static:
        error = Static("", classes="params-form--error", markup=False)
        error.display = False
        self._errors[name] = error
        return error

    def _compose_other(self) -> ComposeResult:
        """The values no field takes, as one JSON object: kept on resubmit, and in sight."""
        yield Label(f"{self.OTHER_PARAMS}: dict (JSON)", classes="params-form--label", markup=False)
        names = ", ".join(sorted(self._other))
        yield Static(
            printable_lines(f"params this form has no field for, submitted as they are: {names}"),
            classes="params-form--hint",
            markup=False,
        )
        text = json_text(self._other)
        self._filled[self.OTHER_PARAMS] = text
        widget = Input(text, placeholder='{"key": "value"}  (empty: none)', id="params-field-other")
        widget.cursor_blink = self._cursor_blink
        widget.add_class("params-form--input")
        self._inputs[self.OTHER_PARAMS] = widget
        yield widget
        yield self._error_line(self.OTHER_PARAMS)

    # ------------------------------------------------------------ public API

    def field_widget(self, name: str) -> Input | Switch | Select[str]:
        """The Input, Switch or Select of field ``name`` (or of ``OTHER_PARAMS``)."""
        return self._inputs[name]

    def field_error(self, name: str) -> str:
        """The error shown under field ``name`` ("" when none)."""
        error = self._errors[name]
        return str(error.content) if error.display else ""

    @property
    def general_error(self) -> str:
        """The message of the errors that name no field ("" when none)."""
        if not self.is_mounted:
            return ""
        general = self.query_one("#params-form-general-error", Static)
        return str(general.content) if general.display else ""

    def collect(self) -> dict[str, Any]:
        """The params as a dict; raises ParamsFormError (and shows it inline) when a field
        does not parse. A field still as ``values`` filled it gives that value exactly. Empty
        nullable fields become None; other empty fields that are not required are left out, so
        the task's default applies (also one the schema does not state, as for
        ``default_factory``); only required ones are refused when empty. A secret left at its
        schema default is left out too: that default is a mask, not the secret."""
        params: dict[str, Any] = {}
        errors: list[dict[str, Any]] = []
        for spec in self.fields:
            widget = self._inputs[spec.name]
            if _shown_value(widget) == self._filled.get(spec.name):
                if spec.name in self._initial:
                    params[spec.name] = copy.deepcopy(self._initial[spec.name])
                    continue
                if spec.secret and spec.has_default:
                    continue
            if isinstance(widget, Switch):
                params[spec.name] = widget.value
                continue
            # a Select's blank is nothing picked; its "" (a string enum's empty choice) is a pick
            picked = isinstance(widget, Select) and isinstance(widget.value, str)
            raw = widget.value if isinstance(widget.value, str) else ""
            if not picked and (raw if spec.kind == "str" else raw.strip()) == "":
                if spec.nullable:
                    params[spec.name] = None
                elif spec.required:
                    errors.append(_error(spec.name, "this field is required", "missing"))
                continue
            if spec.name in self._quoted:
                raw = _unquoted(raw)
            try:
                params[spec.name] = value = _parse(spec, raw)
            except ValueError as exc:
                errors.append(_error(spec.name, str(exc), "value_error"))
                continue
            broken = _broken_limit(spec, value)
            if broken:
                errors.append(_error(spec.name, broken, "value_error"))
        if self._other:
            self._collect_other(params, errors)
        if errors:
            self.show_errors(errors)
            raise ParamsFormError(errors)
        self.clear_errors()
        return params

    def _collect_other(self, params: dict[str, Any], errors: list[dict[str, Any]]) -> None:
        name = self.OTHER_PARAMS
        raw = self._inputs[name].value
        if raw == self._filled[name] or not isinstance(raw, str):  # (always text: an Input)
            params.update(copy.deepcopy(self._other))
            return
        if not raw.strip():
            return
        try:
            value = _loads(raw.strip())
        except ValueError as exc:
            errors.append(_error(name, str(exc), "value_error"))
            return
        if not isinstance(value, dict):
            expected = f"expected a JSON object, e.g. {_EXAMPLES['object']} (empty: none)"
            errors.append(_error(name, expected, "value_error"))
            return
        taken = [key for key in value if any(spec.name == key for spec in self.fields)]
        if taken:
            clash = f"{', '.join(taken)}: has a field of its own above; set it there"
            errors.append(_error(name, clash, "value_error"))
            return
        params.update(value)

    def show_errors(self, errors: Sequence[Mapping[str, Any]]) -> None:
        """Show pydantic-style errors (``loc``, ``msg``) under their fields; errors that
        name no field of this form go to the general error line."""
        self.clear_errors()
        per_field: dict[str, list[str]] = {}
        general: list[str] = []
        for err in errors:
            loc = [str(part) for part in (err.get("loc") or ())]
            msg = str(err.get("msg", "invalid value"))
            if loc and loc[0] in self._errors:
                rest = ".".join(loc[1:])
                per_field.setdefault(loc[0], []).append(f"{rest}: {msg}" if rest else msg)
            else:
                general.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
        for name, messages in per_field.items():
            error = self._errors[name]
            # messages echo what the user typed (and what validators say): escaped, newlines kept
            error.update(printable_lines("\n".join(messages)))
            error.display = True
            self._inputs[name].add_class("-invalid")
        if general and self.is_mounted:
            widget = self.query_one("#params-form-general-error", Static)
            widget.update(printable_lines("\n".join(general)))
            widget.display = True
        order = [spec.name for spec in self.fields] + [self.OTHER_PARAMS]
        first = next((name for name in order if name in per_field), None)
        if first is not None:
            # where the form scrolls (not where focus would put it): once the errors are laid out,
            # the first wrong field at the top, its error under it
            self._inputs[first].focus(scroll_visible=False)
            self.call_after_refresh(self._inputs[first].scroll_visible, top=True, animate=False)
        elif general and self.is_mounted:
            general_line = self.query_one("#params-form-general-error", Static)
            self.call_after_refresh(general_line.scroll_visible, animate=False)

    def clear_errors(self) -> None:
        for name, error in self._errors.items():
            if error.display:
                error.update("")
                error.display = False
            self._inputs[name].remove_class("-invalid")
        if self.is_mounted:
            general = self.query_one("#params-form-general-error", Static)
            general.update("")
            general.display = False

    # ------------------------------------------------------------ internals

    @staticmethod
    def _placeholder(spec: FieldSpec) -> str:
        """What an empty field means; it may quote the task's choices and default, so it is made
        printable and (for a Select) kept from being read as markup."""
        return _AsWritten(printable(ParamsForm._empty_hint(spec)))

    @staticmethod
    def _empty_hint(spec: FieldSpec) -> str:
        if spec.nullable:
            hint = "empty: null"
        elif spec.has_default:
            # said outright: an emptied field means the task's default, not "nothing"
            hint = f"empty: the default, {_default_text(spec)}"
        elif not spec.required:
            hint = "empty: the task's default"  # made by a factory: the schema does not say
        else:
            hint = "required"
        if spec.kind == "json" and spec.json_type in _EXAMPLES:
            return f"{_EXAMPLES[spec.json_type]}  ({hint})"
        if spec.choices:
            return f"{' | '.join(map(_choice_text, spec.choices))}  ({hint})"
        return hint

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit()

    def submit(self) -> bool:
        """Post :class:`Submitted` with the params the fields hold, as Enter in a field does;
        False (each problem shown under its field) when a field does not parse. For a form with
        no text field to press Enter in (switches and choices only, or no params): call it
        from a button of the app's, or bind a key to ``action_submit``."""
        try:
            params = self.collect()
        except ParamsFormError:
            return False
        self.post_message(self.Submitted(self, params))
        return True

    def action_submit(self) -> None:
        self.submit()


_QUOTED_HINT = (
    'shown as a JSON string: "" is empty text, \\u001b and the like are control characters; '
    "text without the quotes is taken as typed"
)


def _shown_value(widget: Input | Switch | Select[str]) -> str | bool | None:
    """What a field holds, as ``ParamsForm._filled`` records it (None: a Select's blank)."""
    if isinstance(widget, Switch):
        return widget.value
    if isinstance(widget, Select):
        return widget.value if isinstance(widget.value, str) else None
    return widget.value


def _choice_text(choice: str) -> str:
    """A string enum's value as the form names it: ``""`` for the empty one (and quoted where
    it is only blanks), which would otherwise read as nothing, or as the blank entry."""
    return json_text(choice) if not choice.strip() else choice


def _choice_label(choice: str) -> Text:
    """A string enum's value as its Select lists it: drawn as written, ``""`` said to be empty text."""
    label = Text(printable(_choice_text(choice)))
    if choice == "":
        label.append("  (empty text)", style="dim")
    return label


def _unquoted(raw: str) -> str:
    """A string field shown JSON-quoted: the string its text spells as JSON, else the text as typed."""
    try:
        value = json.loads(raw.strip())
    except ValueError:
        return raw
    return value if isinstance(value, str) else raw


class _AsWritten(str):
    """Text drawn as written wherever Textual draws it. A Select draws its prompt twice: as
    the blank option of its list (plain text, fine) and, while nothing is picked, through a
    Static that would read it as markup, where a choice or default like ``a[/]b`` crashes the
    app. Textual draws an object with a ``visualize`` method as what that returns, before it
    would parse a str as markup."""

    __slots__ = ()

    def visualize(self) -> Content:
        return Content(str(self))


def _default_text(spec: FieldSpec) -> str:
    text = json.dumps(spec.default, ensure_ascii=False, default=str)
    return text if len(text) <= 30 else text[:29] + "…"


def _broken_limit(spec: FieldSpec, value: Any) -> str:
    """The first schema limit ``value`` breaks, said plainly ("" when none)."""
    for key, bound in spec.limits:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (key == "minimum" and value < bound) or (key == "exclusiveMinimum" and value <= bound) or (
                key == "maximum" and value > bound
            ) or (key == "exclusiveMaximum" and value >= bound):
                return f"must be {spec.limits_text()}"
        size = len(value) if isinstance(value, (str, list, dict)) else None
        if size is None:
            continue
        if key in ("minLength", "minItems") and size < bound:
            return f"must be {spec.limits_text()} (got {size})"
        if key in ("maxLength", "maxItems") and size > bound:
            return f"must be {spec.limits_text()} (got {size})"
    return ""


def _error(name: str, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": (name,), "msg": msg, "type": kind}


def _three_way(spec: FieldSpec) -> bool:
    """A bool field that may be left unset: null allowed, or optional with no stated default."""
    return spec.nullable or not (spec.required or spec.has_default)


def _echo(text: str, limit: int = 40) -> str:
    """``text`` quoted for an error message, cut so a pasted screenful does not bury the message."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON: {name} is not a JSON number; JSON cannot carry nan or infinity")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"invalid JSON: {_echo(text)} is too large for a number (it would be infinity)")
    return number


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


def _is_json_type(value: Any, json_type: str | None) -> bool:
    if json_type is None:
        return not isinstance(value, str)
    if json_type == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if json_type == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if json_type == "boolean":
        return isinstance(value, bool)
    if json_type == "array":
        return isinstance(value, list)
    if json_type == "object":
        return isinstance(value, dict)
    return False


def _float_keeps(text: str, number: float) -> bool:
    """Whether ``number``, read from ``text``, is still the number typed: written back as
    the shortest text that reads as it, it is the same number (20 digits are not)."""
    try:
        return Decimal(repr(number)) == Decimal(text)
    except InvalidOperation:
        return False


def _parse_text_union(spec: FieldSpec, raw: str) -> Any:
    """A union with a string: the value of another member when the text reads as one, a JSON
    string when quoted, else the text itself."""
    text = raw.strip()
    try:
        value = _loads(text)
    except ValueError:
        return raw
    if isinstance(value, float) and not _float_keeps(text, value):
        # pydantic's Decimal is such a union (number or string): a float would round the
        # amount typed, while the text reaches the task exactly, as engine.submit's would
        return raw
    if isinstance(value, str) or any(_is_json_type(value, t) for t in spec.alternatives):
        return value
    return raw


def _parse(spec: FieldSpec, raw: str) -> Any:
    if spec.kind == "bool":
        return raw.strip() == "true"
    if spec.kind == "str":
        if spec.choices and raw not in spec.choices:
            raise ValueError(f"must be one of: {', '.join(map(_choice_text, spec.choices))}")
        return raw
    text = raw.strip()
    if spec.kind == "int":
        try:
            return int(text)
        except ValueError:
            digits = text.lstrip("+-").replace("_", "")
            limit = sys.get_int_max_str_digits()  # 0: no limit
            if digits.isdigit() and limit and len(digits) > limit:
                raise ValueError(
                    f"integer too long: {len(digits)} digits, more than the {limit} that Python "
                    "reads from text (its int limit)"
                ) from None
            raise ValueError(f"not an integer: {_echo(text)}") from None
    if spec.kind == "float":
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"not a number: {_echo(text)}") from None
        if not math.isfinite(number):
            raise ValueError(f"not a finite number: {_echo(text)} (JSON cannot carry nan or infinity)")
        return number
    if spec.text_fallback:
        return _parse_text_union(spec, raw)
    value = _loads(text)
    if spec.json_type == "array" and not isinstance(value, list):
        raise ValueError(f"expected a JSON list, e.g. {_EXAMPLES['array']}")
    if spec.json_type == "object" and not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, e.g. {_EXAMPLES['object']}")
    return value
