"""Config schemas checked before any work: dataclasses whose fields carry their type and range.

A schema is a dataclass. Each field's annotation is its type — ``bool`` (only ``true``/``false``),
``int``, ``float`` (finite; an integer is accepted), ``str``, ``list[T]``, ``dict``/``Any`` (any
mapping / value), ``T | None`` or a nested schema — and :func:`spec` adds its constraints: allowed
values (``choices``, a list or a callable returning the live registry), bounds (``ge``, ``gt``,
``le``, ``lt``; for a list they apply to every entry), a list's ``length`` or ``nonempty``.

:func:`check` turns a mapping into the dataclass or raises :class:`ConfigError` with one line that
names the key, the value and what is valid, e.g.::

    unknown key 'lissa_dept'; did you mean 'lissa_depth'? valid keys: name, scenario, ...
    study.batch_size=0 must be an integer >= 1
    resume='no' must be true or false
    model.activation='relu6' is not an activation; valid: relu, tanh, sigmoid, gelu, elu, softplus
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast


class ConfigError(ValueError):
    """A one-line configuration error raised before any work starts."""


def one_line(e: Exception | str) -> str:
    """The message of ``e`` on one line (whitespace runs collapsed)."""
    return " ".join(str(e).split())


def spec(
    default: Any = dataclasses.MISSING,
    *,
    choices: Sequence | Callable[[], Sequence] | None = None,
    what: str = "",
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    length: int | None = None,
    nonempty: bool = False,
    doc: str = "",
) -> Any:
    """A dataclass field with constraints (see the module docstring); list/dict defaults are copied."""
    meta = {
        "choices": choices,
        "what": what,
        "ge": ge,
        "gt": gt,
        "le": le,
        "lt": lt,
        "length": length,
        "nonempty": nonempty,
        "doc": doc,
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)  # type: ignore[misc]
    return dataclasses.field(default=default, metadata=meta)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_keys(prefix: str, given: Sequence[str] | Mapping[str, Any], valid: Sequence[str]) -> None:
    """Refuse keys not in ``valid``, suggesting the closest valid key (a typo like ``lissa_dept``)."""
    unknown = [k for k in given if k not in valid]
    if not unknown:
        return
    key = str(unknown[0])
    if not valid:
        raise ConfigError(f"unknown key {_key(prefix, key)!r}: {prefix or 'this config'} takes no keys")
    close = difflib.get_close_matches(key, [str(v) for v in valid], n=1, cutoff=0.6)
    hint = f"did you mean {_key(prefix, close[0])!r}? " if close else ""
    more = f" (and {sorted(map(str, unknown[1:]))})" if len(unknown) > 1 else ""
    raise ConfigError(f"unknown key {_key(prefix, key)!r}{more}; {hint}valid keys: {', '.join(map(str, valid))}")


def _split_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional  # noqa: UP007 (built at run time)
    return tp, False


def _bounds(meta: Mapping[str, Any]) -> str:
    parts = [
        f"{op} {meta[k]:g}"
        for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if meta.get(k) is not None
    ]
    return " and ".join(parts)


def _scalar_ok(tp: Any, v: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_scalar_ok(t, v) for t in typing.get_args(tp))
    if tp is bool:
        return v is True or v is False
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if tp is str:
        return isinstance(v, str)
    return True


_NOUN = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
_NOUNS = {int: "integers", float: "finite numbers", str: "strings", bool: "booleans"}


def _in_range(v: Any, meta: Mapping[str, Any]) -> bool:
    return (
        (meta.get("ge") is None or v >= meta["ge"])
        and (meta.get("gt") is None or v > meta["gt"])
        and (meta.get("le") is None or v <= meta["le"])
        and (meta.get("lt") is None or v < meta["lt"])
    )


def _choices(meta: Mapping[str, Any]) -> list | None:
    c = meta.get("choices")
    return list(c() if callable(c) else c) if c is not None else None


def check_value(key: str, value: Any, tp: Any, meta: Mapping[str, Any] | None = None) -> Any:
    """Check one value against its type and constraints; returns it (a nested schema: its dataclass)."""
    meta = meta or {}
    declared = tp
    tp, optional = _split_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}=None is not allowed; expected {_describe(tp, meta)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            keys = ", ".join(f.name for f in dataclasses.fields(tp))
            raise ConfigError(f"{key}={value!r} must be a group of keys ({keys})")
        return check(key, cast(type, tp), value)
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)) or not all(_scalar_ok(item, x) for x in value):
            raise ConfigError(f"{key}={value!r} must be {_describe(declared, meta)}")
        if meta.get("length") is not None and len(value) != meta["length"]:
            raise ConfigError(f"{key}={value!r} must be {_describe(tp, meta)}")
        if meta.get("nonempty") and not value:
            raise ConfigError(f"{key}=[] must be {_describe(tp, meta)}")
        bad = [x for x in value if not _in_range(x, meta)]
        if bad:
            raise ConfigError(f"{key}={list(value)!r}: {bad[0]!r} is out of range; expected {_describe(tp, meta)}")
        for x in value:
            _check_choice(f"{key}={list(value)!r}: {x!r}", x, meta)
        return list(value)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be a mapping {{key: value}}")
        return dict(value)
    if not _scalar_ok(tp, value) or not _in_range(value, meta):
        raise ConfigError(f"{key}={value!r} must be {_describe(declared, meta)}")
    _check_choice(f"{key}={value!r}", value, meta)
    return value


def _check_choice(head: str, value: Any, meta: Mapping[str, Any]) -> None:
    valid = _choices(meta)
    if valid is not None and value not in valid:
        close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close and close[0] != str(value) else ""
        raise ConfigError(
            f"{head} is not {meta.get('what') or 'a valid choice'}{hint}; valid: {', '.join(map(str, valid))}"
        )


def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    tp, optional = _split_optional(tp)
    origin = typing.get_origin(tp) or tp
    rng = _bounds(meta)
    valid = _choices(meta)
    if origin in (list, tuple, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        n = f"{meta['length']} " if meta.get("length") is not None else ""
        text = ("a non-empty " if meta.get("nonempty") else "a ") + f"list of {n}{_NOUNS.get(item, 'values')}"
        text += f" {rng}" if rng else ""
        if valid is not None:
            text += f" from: {', '.join(map(str, valid))}"
    elif typing.get_origin(tp) in (typing.Union, types.UnionType):
        text = " or ".join(_NOUN.get(t, getattr(t, "__name__", str(t))) for t in typing.get_args(tp))
    else:
        text = _NOUN.get(tp, getattr(tp, "__name__", str(tp))) + (f" {rng}" if rng else "")
    return text + (" or null" if optional else "")


def check(prefix: str, cls: type, values: Mapping[str, Any]) -> Any:
    """``cls(**values)`` after checking every key and value against the schema ``cls``."""
    flds = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(prefix, values, list(flds))
    hints = typing.get_type_hints(cls)
    out = {k: check_value(_key(prefix, k), v, hints[k], flds[k].metadata) for k, v in values.items()}
    try:
        return cls(**out)
    except (ValueError, TypeError) as e:  # the schema's own __post_init__ checks
        msg = one_line(e)
        raise ConfigError(msg if prefix and msg.startswith(prefix) else f"{prefix or cls.__name__}: {msg}") from None


def signature_schema(
    name: str, fn: Callable, skip: Sequence[str] = (), rules: Mapping[str, Mapping[str, Any]] | None = None
) -> type:
    """A schema from the keyword parameters of ``fn`` (a function or a class's ``__init__``): their
    annotations and defaults, plus ``rules[param]`` (``spec`` keywords) for allowed values."""
    import inspect

    target = fn.__init__ if isinstance(fn, type) else fn  # type: ignore[misc]
    hints = typing.get_type_hints(target)
    rules = rules or {}
    fields = []
    for p in inspect.signature(target).parameters.values():
        if p.name in ("self", *skip) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = p.default if p.default is not inspect.Parameter.empty else dataclasses.MISSING
        if isinstance(default, tuple):
            default = list(default)
        fields.append((p.name, hints.get(p.name, Any), spec(default, **rules.get(p.name, {}))))
    return dataclasses.make_dataclass(name, fields, kw_only=True)
