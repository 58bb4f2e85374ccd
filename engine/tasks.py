"""Task definitions: what ``@engine.task`` records about a function."""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import logging
import math
import types
import typing
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PydanticUserError, RootModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticSerializationError, to_json

from .errors import InvalidConfiguration, InvalidParams, TaskDefinitionError, shown
from .jsonsafe import (
    NotJsonSafe,
    check_jsonable,
    encode_problem,
    jsonable,
    name_problem,
    non_finite_problem,
    safe_str,
    utf8_text,
)

log = logging.getLogger("taskwatch.engine")

TaskFn = Callable[..., Awaitable[Any]]


class TaskInfo(BaseModel):
    """A registered task as a client sees it: enough to build a submit form."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    description: str = ""
    submittable: bool
    retries: int
    timeout: float | None
    concurrency: int | None
    params_schema: dict[str, Any] = Field(default_factory=dict)


@dataclass(slots=True)
class TaskSpec:
    name: str
    fn: TaskFn
    params_model: type[BaseModel] | None
    retries: int = 0
    timeout: float | None = None
    concurrency: int | None = None
    backoff: float = 0.5
    backoff_max: float = 60.0
    #: where runs of this task come from: "task", "periodic", "trigger"
    kind: str = "task"
    #: names of engine resources passed to the function as keyword arguments
    resources: tuple[str, ...] = ()
    description: str = ""
    #: what recovery does with a run whose worker was lost: run it again, or fail it
    on_lost: Literal["retry", "fail"] = "retry"
    #: the params' JSON schema, made once: every snapshot carries it
    schema: dict[str, Any] = dataclass_field(init=False, repr=False)
    #: redefined since (``register(..., replace=True)``): runs holding this spec look up the new one
    replaced: bool = dataclass_field(init=False, repr=False, default=False)

    def __post_init__(self) -> None:
        # checked before the engine records the spec, so a refused name registers nothing
        problem = name_problem("name", self.name)
        if problem is not None:
            raise InvalidConfiguration(f"{self.kind} {self.name!r}", [problem])
        self.schema = _params_schema(self.name, self.params_model)

    @property
    def submittable(self) -> bool:
        return self.kind == "task"

    def validate_params(self, params: BaseModel | dict[str, Any] | None) -> tuple[BaseModel | None, dict[str, Any]]:
        """The params as the task's model and as JSON-ready data; raises InvalidParams."""
        model_cls = self.params_model
        if model_cls is None:
            # exactly None or {}: 0, "" or [] are params given by mistake, not "none"
            if params is not None and not (isinstance(params, dict) and not params):
                raise InvalidParams(
                    self.name,
                    [{"loc": ("params",), "msg": f"task {self.name!r} takes no params: leave them out (or give None or {{}}), "
                      f"not {shown(params)}", "type": "extra_forbidden"}],
                )
            return None, {}
        given: Any = params  # what the model validates
        try:
            if isinstance(params, model_cls):
                # validated again (model_construct skips validation), from its field values
                # keyed as the model takes them (by alias, where it has one) and its extra
                # ones (a model with extra="allow")
                given = _input_of(params)
                model = model_cls.model_validate(given)
            elif isinstance(params, BaseModel):
                # (a computed field is no input: passed on, extra="forbid" would refuse it)
                given = params.model_dump(exclude=set(type(params).model_computed_fields))
                model = model_cls.model_validate(given)
            elif isinstance(params, Mapping):
                # a dict is data as JSON would carry it (the control endpoint's, a dashboard's
                # form): read as a record is, so a strict model takes its dates from their text
                model = params_from_record(model_cls, params)
            else:
                given = params if params is not None else {}
                model = model_cls.model_validate(given)
        except ValidationError as exc:
            raise InvalidParams(self.name, _problems(exc)) from None
        except UnicodeEncodeError as exc:
            raise _unencodable_message(self.name, model_cls, given, exc) from None
        except Exception as exc:
            raise _validator_raised(self.name, model_cls, exc) from exc
        try:
            return recorded_params(self.name, model)
        except InvalidParams:
            raise
        except Exception as exc:  # its validators run again, on the record read back
            raise _validator_raised(self.name, model_cls, exc) from exc

    def info(self) -> TaskInfo:
        return TaskInfo(
            name=self.name,
            kind=self.kind,
            description=self.description,
            submittable=self.submittable,
            retries=self.retries,
            timeout=self.timeout,
            concurrency=self.concurrency,
            params_schema=self.schema,
        )


def _validator_raised(task: str, model_cls: type[BaseModel], exc: Exception) -> InvalidParams:
    """The params refused, for a validator of their model that raised what pydantic passes
    through (a KeyError from a lookup, say) rather than a ValueError it would report."""
    return InvalidParams(
        task,
        [{"loc": ("params",), "msg": f"a validator of {model_cls.__qualname__} raised {type(exc).__name__}: "
          f"{safe_str(exc)} (raise ValueError in validators for pydantic to report it as a field's)",
          "type": "validator_raised"}],
    )


def _unencodable_message(
    task: str, model_cls: type[BaseModel], given: Any, exc: UnicodeEncodeError
) -> InvalidParams:
    """The params refused, for a validator whose error message UTF-8 cannot encode.

    A validator's ValueError naming a value that holds a lone surrogate (a path from
    ``os.fsdecode``, say) is no error pydantic-core can make: it raises UnicodeEncodeError
    instead, which names neither the field nor the message. The params are validated again
    with their text escaped (``\\udcff``), as the engine escapes text everywhere: the field's
    own problems, its message naming the value escaped. If that does not tell (the text came
    from elsewhere), the message alone, escaped, of the params as a whole.
    """
    escaped = _escaped_input(given)
    refused = _refused(model_cls, escaped) if escaped is not given else None
    if refused is not None:
        return InvalidParams(task, _problems(refused))
    message = utf8_text(exc.object) if isinstance(exc.object, str) else safe_str(exc)
    return InvalidParams(
        task,
        [{"loc": ("params",), "msg": f"a validator of {model_cls.__qualname__} refused them: {message}",
          "type": "value_error"}],
    )


def _refused(model_cls: type[BaseModel], data: Any) -> ValidationError | None:
    """What ``model_cls`` says of ``data`` when it refuses it as pydantic reports refusals."""
    try:
        model_cls.model_validate(data)
    except ValidationError as exc:
        return exc
    except Exception:  # noqa: BLE001 - anything else tells nothing of the fields
        return None
    return None


def _escaped_input(value: Any) -> Any:
    """``value`` with what UTF-8 cannot encode in its text (keys too) escaped; the very same
    object when it has nothing to escape."""
    if isinstance(value, str):
        return utf8_text(value)
    if isinstance(value, Mapping):
        items = [(_escaped_input(k), _escaped_input(v)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
            return value
        return dict(items)
    if isinstance(value, (list, tuple)):
        escaped = [_escaped_input(item) for item in value]
        if all(e is item for e, item in zip(escaped, value, strict=True)):
            return value
        return type(value)(escaped) if type(value) in (list, tuple) else escaped
    return value


#: how each kind's options are written, for the error an option given by position gets
_OPTIONS_BY_KEYWORD = {
    "task": "@engine.task(retries=3)",
    "periodic task": "@engine.periodic(every=60)",
    "worker": "@engine.supervised(name='indexer')",
}


def registered_name(fn: object, name: str | None, kind: str) -> str:
    """The name ``fn`` registers under as a ``kind``: ``name``, else its ``__name__``.

    Raises :class:`TaskDefinitionError` for something that is no function (an
    option given by position, as in ``@engine.periodic(60)``), and for one with
    no ``__name__`` and no ``name``: a repr, with its memory address, would name
    it differently on every node and at every restart.
    """
    if not callable(fn):
        example = _OPTIONS_BY_KEYWORD.get(kind)
        raise TaskDefinitionError(
            f"{shown(fn)} is not a function: a {kind} is registered on an `async def` "
            "function, and its options are keywords" + (f", as in {example}" if example else "")
        )
    if name is not None:
        return name
    own = getattr(fn, "__name__", None)
    if own is None:
        raise TaskDefinitionError(f"{fn!r} has no __name__ (a functools.partial, say): give the {kind} a name=")
    return str(own)


def _params_schema(task: str, model: type[BaseModel] | None) -> dict[str, Any]:
    """JSON schema of a task's params model (an empty object's when it takes none).

    A model pydantic makes no JSON schema for (a field of an arbitrary class, a
    plain validator) still validates params, so the task registers; its schema
    says why there is none, where a dashboard's submit form looks for fields.
    Left to every snapshot to find out, it would stop each dashboard attaching.
    """
    if model is None:
        return {"type": "object", "properties": {}, "title": f"{task} params"}
    try:
        schema = model.model_json_schema()
        check_jsonable(schema)
    except (PydanticUserError, NotJsonSafe, ValueError, TypeError) as exc:
        # (pydantic's own text goes on with a line pointing at its documentation)
        reason = (exc.detail if isinstance(exc, NotJsonSafe) else encode_problem(exc)).split("\n", 1)[0]
        log.warning(
            "task %r: its params model %s has no JSON schema (%s), so dashboards cannot show a "
            "form for it; give each field a type pydantic makes a schema for, or annotate it "
            "with pydantic's WithJsonSchema", task, model.__qualname__, reason,
        )
        return {
            "type": "object",
            "title": f"{task} params",
            "description": f"no JSON schema: {reason}",
        }
    return schema


def recorded_params(task: str, model: BaseModel) -> tuple[BaseModel, dict[str, Any]]:
    """``model`` read back from its JSON record, and that record; raises :class:`InvalidParams`.

    The task runs with the params read back from what is recorded, as a retry,
    a durable store's next start and another node do: a model of its own,
    which the caller's later changes to its objects cannot reach. Params no
    dashboard could decode (a lone surrogate, say) are refused, so nothing
    undecodable is ever recorded or published; so are params that do not read
    back as they were (a ``SecretStr`` dumps masked, a field excluded from
    dumps is lost), which would run differently there.
    """
    first: InvalidParams | None = None
    for make in (_record_by_input_names, _record_by_alias):
        try:
            return _read_back_record(task, model, make(task, model))
        except InvalidParams as exc:
            # the record by the models' input names re-keys pydantic models only: a nested
            # dataclass or TypedDict with an alias takes it by that alias, as the dump by
            # alias (how params were first recorded) has it. The first record's problem is
            # the one to tell.
            if first is None:
                first = exc
    assert first is not None
    raise first


def _record_by_input_names(task: str, model: BaseModel) -> Any:
    """``model`` dumped keyed as the models in it take their input (the params schema's names)."""
    try:
        dumped = model.model_dump(mode="json", by_alias=False)
        return dumped if _dumps_as_input(type(model)) else _record_of(model, dumped)
    except (PydanticSerializationError, ValueError, TypeError) as exc:
        _refuse_non_finite(task, model)
        _refuse_raw_bytes(task, model)
        raise json_unsafe(task, encode_problem(exc)) from None


def _record_by_alias(task: str, model: BaseModel) -> Any:
    try:
        return model.model_dump(mode="json", by_alias=True)
    except (PydanticSerializationError, ValueError, TypeError) as exc:
        _refuse_non_finite(task, model)
        _refuse_raw_bytes(task, model)
        raise json_unsafe(task, encode_problem(exc)) from None


def _read_back_record(task: str, model: BaseModel, dumped: Any) -> tuple[BaseModel, dict[str, Any]]:
    if not isinstance(dumped, dict):
        # a RootModel of a list or a number, whose schema registration could not read
        problem = (
            f"{type(model).__name__} dumps as a {type(dumped).__name__}, not as a JSON object: a run's "
            "params are one object of named values"
        )
        raise InvalidParams(task, [{"loc": ("params",), "msg": problem, "type": "not_an_object"}])
    try:
        encoded = check_jsonable(dumped)
    except NotJsonSafe as exc:
        _refuse_non_finite(task, model)
        raise json_unsafe(task, exc.detail) from None
    try:
        return same_as_given(model, params_from_record(type(model), dumped, encoded)), dumped
    except ValidationError as exc:
        problems = _problems(exc)
    except NotReadBack as exc:
        problems = exc.problems
    _refuse_non_finite(task, model)
    raise InvalidParams(task, _lost_in_json(problems)) from None


def params_from_record(cls: type[BaseModel], record: Any, encoded: bytes | None = None) -> BaseModel:
    """The params of model ``cls`` a run gets from their JSON ``record`` (``encoded``: its JSON
    text, if at hand), or from a dict given to submit; raises ValidationError.

    The record is read as the Python data it is first, which is the cheaper read and takes
    what every lax model dumps. What that refuses is read from its JSON text, as pydantic
    reads JSON: a strict model takes a datetime, UUID, enum or tuple from JSON's text and
    lists alone, never from the Python str or list that stands for it. Submit and each
    attempt read a record alike, so a run gets the params its submit checked.

    A dict given to submit is read the same way when it is plain JSON data (a dashboard's
    form, the control endpoint), so ``{"day": "2024-01-02"}`` fills a strict model's date.
    One holding values JSON has no type for (a date, a set) is read as given only: its JSON
    stand-ins would coerce a date into a str field. A dict whose keys would become one JSON
    key (``1`` and ``"1"``) is not read from JSON, which would lose one of them.
    """
    try:
        return cls.model_validate(record)
    except ValidationError as exc:
        python_error = exc
    if encoded is None:
        try:
            data = jsonable(record, finite=False, distinct_keys=True)
        except NotJsonSafe:
            raise python_error from None  # no JSON text: the Python read is the only one
        if not _same(data, record):
            # values JSON has no type for (a date, a set): read as given, never as their stand-ins
            raise python_error from None
        encoded = to_json(data)  # (NaN as JSON's NaN, which the read takes back)
    # (out of the handler: the JSON read's own error is the one to tell)
    return cls.model_validate_json(encoded)


class NotReadBack(ValueError):
    """A value's record reads back as something else; ``problems`` say where, in pydantic's
    error shape (``loc``, ``msg``, ``type``)."""

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems))


def read_back(given: BaseModel, record: Any, read: Callable[[Any], Any]) -> BaseModel:
    """``given`` as ``read`` makes it from its JSON ``record``; raises :class:`NotReadBack` when
    that is not the same value (a tuple reading back as a list of the same items, and an
    aware datetime at the same instant, count as the same)."""
    try:
        stored = read(record)
    except ValidationError as exc:
        raise NotReadBack(_problems(exc)) from None
    return same_as_given(given, stored)


def same_as_given(given: BaseModel, stored: Any) -> BaseModel:
    """``stored`` (``given`` read back from its record) if it is the same value as ``given``;
    raises :class:`NotReadBack` saying where it is not."""
    if stored == given or _same(stored, given):
        return typing.cast(BaseModel, stored)
    if type(stored) is not type(given):
        raise NotReadBack([{
            "loc": (),
            "msg": f"reads back as a {type(stored).__qualname__}, not the {type(given).__qualname__} given",
            "type": "value_error",
        }])
    names = type(given).model_fields
    changed = [name for name in names if not _same(getattr(stored, name, None), getattr(given, name, None))]
    raise NotReadBack(
        [{"loc": (name,), "msg": "reads back as another value", "type": "value_error"} for name in changed]
        # no field differs: an extra value (extra="allow") does
        or [{"loc": (), "msg": "its extra values read back as other values", "type": "value_error"}]
    )


def json_params(task: str, params: Mapping[Any, Any]) -> dict[str, Any]:
    """``params`` (a dict) as the JSON data that carries them to an engine in another process;
    raises :class:`InvalidParams`, as an in-process submit does for such values.

    Values travel as their JSON stand-ins (a date as its ISO text, a set as a list), which
    the task's model at the other end reads as it reads JSON. Refused: values UTF-8 JSON
    cannot carry, and a dict whose keys would become one JSON key (``{1: "a", "1": "b"}``),
    which would arrive with an entry lost. NaN and infinity are left in, for that engine to
    judge as in-process.
    """
    try:
        data = jsonable(dict(params), finite=False, distinct_keys=True)
    except NotJsonSafe as exc:
        raise json_unsafe(task, exc.detail) from None
    return data  # type: ignore[no-any-return]


#: model class -> whether its dump by field name is its input as it is (no alias, no computed
#: field, at any level): most params models, whose record then costs no walk of the dump
_AS_INPUT: weakref.WeakKeyDictionary[type[BaseModel], bool] = weakref.WeakKeyDictionary()


def _dumps_as_input(cls: type[BaseModel], seen: frozenset[type[BaseModel]] = frozenset()) -> bool:
    known = _AS_INPUT.get(cls)
    if known is not None:
        return known
    if cls in seen:
        return False  # a model that nests itself: the walk handles it
    seen |= {cls}
    plain = (
        not issubclass(cls, RootModel)
        and not cls.model_computed_fields
        and all(
            _input_path(cls, name, field) == (name,)
            and all(_dumps_as_input(nested, seen) for nested in _models_in(field.annotation))
            for name, field in cls.model_fields.items()
        )
    )
    _AS_INPUT[cls] = plain
    return plain


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation names (in ``list[M]``, ``M | None`` and the like)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _record_of(value: Any, dumped: Any) -> Any:
    """``dumped`` (``value``'s JSON dump by field name) keyed as the models in it take their
    input, at every level: the record reads back as ``value``, and its names are the params
    schema's (a field's alias, not its serialization alias). Computed fields are left out:
    they are no input (a model with extra="forbid" refuses them; with extra="allow" they
    would come back as extra values)."""
    if isinstance(value, RootModel):
        return _record_of(value.root, dumped)
    if isinstance(value, BaseModel) and isinstance(dumped, dict):
        cls = type(value)
        fields = cls.model_fields
        computed = cls.model_computed_fields
        out: dict[str, Any] = {}
        for name, item in dumped.items():
            field = fields.get(name)
            if field is None:
                if name not in computed:
                    out[name] = item  # an extra value (extra="allow"), or a model_serializer's own key
                continue
            _put(out, _input_path(cls, name, field), _record_of(getattr(value, name, None), item))
        return out
    if isinstance(value, (list, tuple)) and isinstance(dumped, list) and len(value) == len(dumped):
        return [_record_of(v, d) for v, d in zip(value, dumped)]
    if isinstance(value, dict) and isinstance(dumped, dict) and len(value) == len(dumped):
        # (the JSON dump keeps the order of the dict's items, with its keys as strings)
        return {k: _record_of(v, d) for (k, d), v in zip(dumped.items(), value.values())}
    return dumped


def _input_of(model: BaseModel) -> Any:
    """``model``'s field values (not dumped: validated as they are) keyed as its class takes them."""
    if isinstance(model, RootModel):
        return model.root
    cls = type(model)
    out: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        if name in model.__dict__:
            _put(out, _input_path(cls, name, field), model.__dict__[name])
    out.update(model.__pydantic_extra__ or {})
    return out


def _input_path(cls: type[BaseModel], name: str, field: FieldInfo) -> tuple[str | int, ...]:
    """Where the input of ``cls`` carries field ``name``: its validation alias (the first of
    its choices; an AliasPath is a path into nested data), or its name."""
    alias = field.validation_alias if field.validation_alias is not None else field.alias
    config = cls.model_config
    by_name = bool(config.get("populate_by_name") or config.get("validate_by_name"))
    if alias is None or config.get("validate_by_alias") is False:
        return (name,)
    if isinstance(alias, AliasChoices):
        alias = alias.choices[0]
    if isinstance(alias, str):
        return (alias,)
    path = tuple(alias.path)
    # a path into a list is one the model can read only as far as the list holds items:
    # by name, where the model takes it so
    if by_name and any(isinstance(part, int) for part in path):
        return (name,)
    if not path or any(isinstance(part, int) and part < 0 for part in path):
        return (name,)
    return path


def _put(out: dict[str, Any] | list[Any], path: tuple[str | int, ...], value: Any) -> None:
    """Set ``value`` at ``path`` in nested dicts and lists, making (and padding) them on the way."""
    head, rest = path[0], path[1:]
    child: Any = None
    if isinstance(out, list):
        if not isinstance(head, int):
            return  # another field's path made this a list: that field's value stays
        out.extend([None] * (head + 1 - len(out)))
        if rest and not isinstance(child := out[head], (dict, list)):
            child = out[head] = [] if isinstance(rest[0], int) else {}
        if not rest:
            out[head] = value
    else:
        if not isinstance(head, str):
            return
        if rest and not isinstance(child := out.get(head), (dict, list)):
            child = out[head] = [] if isinstance(rest[0], int) else {}
        if not rest:
            out[head] = value
    if rest:
        _put(child, rest, value)


def _refuse_non_finite(task: str, model: BaseModel) -> None:
    """Params that did not read back as given because of a NaN or an infinity (the JSON dump
    has made it null): say that, and where, rather than "reads back as another value"."""
    try:
        data = model.model_dump(by_alias=True)
    except (PydanticSerializationError, ValueError, TypeError, RecursionError):
        return  # no dump to search: the caller's own problem is the one to tell
    found = non_finite_problem(data)
    if found is not None:
        where, problem = found
        # located at its field, so a form shows it there
        field = where.partition("[")[0] or "params"
        raise InvalidParams(task, [{"loc": (field,), "msg": f"not encodable as UTF-8 JSON: {problem}", "type": "json_unsafe"}])


def _refuse_raw_bytes(task: str, model: BaseModel) -> None:
    """Params holding ``bytes`` that are no UTF-8 text, which pydantic's JSON dump cannot
    carry as it carries bytes by default: say where, and how a model carries any bytes."""
    try:
        data = model.model_dump(by_alias=True)
    except (PydanticSerializationError, ValueError, TypeError, RecursionError):
        return
    where = _raw_bytes_at(data, ())
    if where is not None:
        path = ".".join(map(str, where)) or "params"
        raise InvalidParams(task, [{
            "loc": where[:1] or ("params",),
            "msg": f"not encodable as UTF-8 JSON: {path} holds bytes that are no UTF-8 text; give the model "
            "ConfigDict(ser_json_bytes='base64', val_json_bytes='base64') to carry any bytes",
            "type": "json_unsafe",
        }])  # fmt: skip


def _raw_bytes_at(data: Any, path: tuple[str | int, ...]) -> tuple[str | int, ...] | None:
    """Where in a model's dump ``data`` the first bytes that are no UTF-8 text are, or None.

    Walked with a stack of its own, not by recursion: params nested deeper than Python's
    recursion limit are refused for that, and must not fail here first."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, (bytes, bytearray)):
            try:
                bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                return where
            continue
        items: list[tuple[str | int, Any]]
        if isinstance(value, dict):
            items = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            items = list(enumerate(value))
        else:
            continue
        # reversed onto the stack: the first field is looked at first
        stack.extend(((v, (*where, k)) for k, v in reversed(items)))
    return None


def _same(read_back: Any, given: Any) -> bool:
    """Equal, a tuple and a list of equal items counting as the same (JSON has only lists),
    aware datetimes at the same instant counting as the same, and a NaN as a NaN (JSON's
    ``NaN`` carries it; whether to take it is for the model, or the record's own check)."""
    if isinstance(read_back, dt.datetime) and isinstance(given, dt.datetime):
        return _same_datetime(read_back, given)
    if type(read_back) is float and type(given) is float and math.isnan(read_back) and math.isnan(given):
        return True
    if isinstance(read_back, (list, tuple)) and isinstance(given, (list, tuple)):
        return len(read_back) == len(given) and all(_same(a, b) for a, b in zip(read_back, given))
    if isinstance(read_back, dict) and isinstance(given, dict):
        return read_back.keys() == given.keys() and all(_same(read_back[k], given[k]) for k in read_back)
    if isinstance(read_back, BaseModel) and type(read_back) is type(given):
        return _same(read_back.__dict__, given.__dict__) and _same(read_back.__pydantic_extra__, given.__pydantic_extra__)
    return bool(read_back == given)


def _same_datetime(read_back: dt.datetime, given: dt.datetime) -> bool:
    # an aware datetime reads back with a fixed offset, and PEP 495 makes == between zones
    # false for a time in a DST fold or gap even at the same instant: compare the instants
    back_offset, given_offset = read_back.utcoffset(), given.utcoffset()
    if back_offset is None or given_offset is None:
        return read_back == given
    return read_back.replace(tzinfo=None) - back_offset == given.replace(tzinfo=None) - given_offset


def json_unsafe(task: str, detail: str) -> InvalidParams:
    """The error for params UTF-8 JSON cannot carry (``detail`` says why)."""
    return InvalidParams(task, [{"loc": ("params",), "msg": f"not encodable as UTF-8 JSON: {detail}", "type": "json_unsafe"}])


def _problems(exc: ValidationError) -> list[dict[str, Any]]:
    return [dict(e) for e in exc.errors(include_url=False, include_context=False, include_input=False)]


def _lost_in_json(problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Problems of params that do not survive their JSON record, said so."""
    return [
        {**p, "msg": f"{p['msg']} once recorded as JSON (the task would run with that): "
         "use a type whose JSON dump reads back as the same value", "type": "json_round_trip"}
        for p in problems
    ] or [{"loc": ("params",), "msg": "the params read back from JSON as other values", "type": "json_round_trip"}]


def _shape(fn_name: str) -> str:
    return (
        f"a task is `async def {fn_name}(ctx: TaskContext)` or "
        f"`async def {fn_name}(ctx: TaskContext, params: MyParams)` with MyParams one pydantic model"
    )


def _function_name(fn: TaskFn, name: str) -> str:
    """The name to show in a signature (a ``functools.partial`` has none of its own)."""
    return getattr(_unwrap_partial(fn), "__name__", None) or name


def _call_target(fn: TaskFn) -> TaskFn:
    """``fn``, or the bound ``__call__`` of an object (not a function) that is called as a task."""
    target = _unwrap_partial(fn)
    if target is fn and not inspect.isroutine(fn) and not isinstance(fn, type):
        call = getattr(fn, "__call__", None)
        if call is not None and inspect.isroutine(call):
            return typing.cast(TaskFn, call)
    return fn


def _unwrap_partial(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def async_signature(fn: TaskFn, what: str, takes: str, shape: str) -> tuple[TaskFn, inspect.Signature]:
    """What a call of ``fn`` runs and its signature; :class:`TaskDefinitionError` for
    anything but an async function (or an object whose ``__call__`` is one)."""
    # an object with an `async def __call__` is called as one: its __call__ is what to read
    fn = _call_target(fn)
    if not inspect.iscoroutinefunction(fn):
        raise TaskDefinitionError(
            f"{what} must be an `async def` function taking {takes} (or an object "
            "whose `__call__` is one); "
            "wrap blocking code with `await asyncio.to_thread(...)`"
        )
    try:
        return fn, inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TaskDefinitionError(f"cannot read the signature of {what} ({safe_str(exc)}); {shape}") from None


def check_worker_fn(fn: TaskFn, name: str) -> None:
    """Refuse a supervised worker that cannot be called as ``fn(ctx)``, the only call its
    supervisor makes: otherwise every start fails with a TypeError, restarted forever."""
    fn_name = _function_name(fn, name)
    what = f"supervised worker {name!r}"
    shape = (
        f"a supervised worker is `async def {fn_name}(ctx: TaskContext)`, called with the "
        "TaskContext alone (any further parameter needs a default)"
    )
    _, sig = async_signature(fn, what, "(ctx)", shape)
    try:
        sig.bind(None)
    except TypeError as exc:
        raise TaskDefinitionError(f"{what} cannot be called as {fn_name}(ctx) ({exc}); {shape}") from None


def params_model_of(
    fn: TaskFn, explicit: type[BaseModel] | None, name: str, resources: tuple[str, ...] = ()
) -> type[BaseModel] | None:
    """Find the pydantic params model of a task function from its signature.

    A run calls ``fn(ctx)`` or ``fn(ctx, params)`` plus the ``resources`` as keywords, so a
    signature that call cannot fill is refused here rather than failing every run.
    """
    fn_name = _function_name(fn, name)
    if inspect.isasyncgenfunction(_call_target(fn)):
        raise TaskDefinitionError(
            f"task {name!r} is an async generator (it has a `yield`): a task returns its "
            "result instead, and reports how far it got with `await ctx.progress(done, total)`"
        )
    fn, sig = async_signature(fn, f"task {name!r}", "(ctx, params)", _shape(fn_name))
    # a resource is passed by keyword: an argument it names is no positional one a run must fill
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind is p.POSITIONAL_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in resources)
    ]
    if not positional:
        raise TaskDefinitionError(
            f"task {name!r} must take a TaskContext as its first argument: "
            f"async def {fn_name}(ctx: TaskContext, params: MyParams)"
        )
    if explicit is not None:
        if not (isinstance(explicit, type) and issubclass(explicit, BaseModel)):
            raise TaskDefinitionError(f"params= for task {name!r} must be a pydantic BaseModel subclass")
    # a run fills two positional arguments; with params= a further one that has a default
    # can stay unfilled (as it always could)
    if len(positional) > 2 and (explicit is None or any(p.default is p.empty for p in positional[2:])):
        raise TaskDefinitionError(
            f"task {name!r} takes {len(positional)} positional arguments; a task takes "
            "(ctx) or (ctx, params) where params is one pydantic model"
        )
    takes_more = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    keyword_only = [p for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY and p.name not in resources]
    if len(positional) < 2 and not (explicit is not None and takes_more):
        # the params are passed positionally: a keyword-only one would never receive them
        as_keyword = [
            p.name for p in keyword_only if p.name == "params" or _annotated_as_params(fn, p.name, name)
        ]
        if as_keyword:
            raise TaskDefinitionError(
                f"the params of task {name!r} come as its second positional argument, not as the "
                f"keyword-only {as_keyword[0]!r}: async def {fn_name}(ctx: TaskContext, {as_keyword[0]}: ...)"
            )
    unfilled = [p.name for p in keyword_only if p.default is p.empty]
    if unfilled:
        raise TaskDefinitionError(
            f"task {name!r} has required keyword-only argument(s) {', '.join(unfilled)} that no run "
            f"fills; give them defaults, or pass those values in the params: {_shape(fn_name)}"
        )
    if explicit is not None:
        if len(positional) < 2 and not takes_more:
            raise TaskDefinitionError(
                f"task {name!r} is given params={explicit.__name__} but its function takes only the "
                f"TaskContext; take the params as its second argument: "
                f"async def {fn_name}(ctx: TaskContext, params: {explicit.__name__})"
            )
        return _object_params(explicit, name)
    if len(positional) < 2:
        if _annotated_as_params(fn, positional[0].name, name):
            raise TaskDefinitionError(
                f"the first argument of task {name!r} receives the TaskContext, and its params "
                f"come second: async def {fn_name}(ctx: TaskContext, {positional[0].name}: ...)"
            )
        return None
    model = _resolve_annotation(fn, positional[1].name, name)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TaskDefinitionError(
            f"the params argument {positional[1].name!r} of task {name!r} must be annotated with "
            f"a pydantic BaseModel subclass (got {model!r}), or pass params=Model to the decorator"
        )
    return _object_params(model, name)


def _object_params(model: type[BaseModel], name: str) -> type[BaseModel]:
    """``model``, unless it is a ``RootModel`` whose params would not be a JSON object (a list,
    a number): a run's params are recorded, shown and sent as one object of named values."""
    if not issubclass(model, RootModel):
        return model
    try:
        schema = model.model_json_schema()
    except Exception:  # noqa: BLE001 - no JSON schema: the record is checked at submit
        return model
    ref = schema.get("$ref")
    if isinstance(ref, str):
        schema = schema.get("$defs", {}).get(ref.rsplit("/", 1)[-1], {})
    kind = schema.get("type")
    if kind is not None and kind != "object":
        raise TaskDefinitionError(
            f"the params model {model.__name__} of task {name!r} is a RootModel of a JSON {kind}: a "
            "run's params are one object of named values; give the task a model with a field "
            f"holding it (class {model.__name__}(BaseModel): items: ...)"
        )
    return model


def _annotated_as_params(fn: TaskFn, param: str, name: str) -> bool:
    """Whether ``param`` is annotated with a pydantic model (a ctx annotation that cannot be
    resolved is none of this check's business)."""
    try:
        model = _resolve_annotation(fn, param, name)
    except Exception:  # noqa: BLE001 - TaskDefinitionError, or a hint typing cannot evaluate
        return False
    return isinstance(model, type) and issubclass(model, BaseModel)


def _resolve_annotation(fn: TaskFn, param: str, name: str) -> Any:
    return resolve_annotation(
        fn, param, f"the params argument {param!r} of task {name!r}", "pass params=Model to the decorator"
    )


def resolve_annotation(fn: Any, param: str, what: str, instead: str) -> Any:
    """Resolve one parameter's annotation, including string annotations of local classes.

    ``from __future__ import annotations`` turns annotations into strings; a model
    defined inside a function (common in tests and scripts) is then only found in
    the frame that applies the decorator (or makes the queue), so look there after
    the module globals. ``what`` names the parameter in the error, ``instead`` says
    what else the user can do: :class:`TaskDefinitionError` if it cannot be resolved.
    """
    target = _call_target(_unwrap_partial(fn))
    try:
        # (typing reads the hints of the function a functools.partial wraps, not of the partial)
        return typing.get_type_hints(target).get(param)
    except Exception:  # noqa: BLE001 - another parameter's annotation may be what fails: this one alone below
        pass
    raw = inspect.signature(fn).parameters[param].annotation
    if not isinstance(raw, str):
        return raw
    # this parameter's annotation alone, so that one typing cannot evaluate elsewhere in the
    # signature (a ctx annotation imported under TYPE_CHECKING) does not hide it
    alone = types.SimpleNamespace(__annotations__={param: raw})
    globalns = getattr(target, "__globals__", {})
    # the caller's frames, not this one's: its locals are no user's names
    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None
    try:
        depth = 0
        localns: dict[str, Any] | None = None
        while True:
            try:
                return typing.get_type_hints(alone, globalns, localns)[param]
            except NameError:
                pass
            except Exception as exc:  # noqa: BLE001 - typing raises what the annotation's own code raises
                raise TaskDefinitionError(
                    f"cannot resolve the annotation {raw!r} of {what} ({safe_str(exc)}); annotate it "
                    f"with a pydantic model defined at module level, or {instead}"
                ) from None
            if frame is None or depth >= 8:
                break
            localns = frame.f_locals
            frame = frame.f_back
            depth += 1
    finally:
        del frame
    raise TaskDefinitionError(
        f"cannot resolve the annotation {raw!r} of {what}; define the model at module level, or {instead}"
    )
