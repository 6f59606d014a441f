"""Typed, validated option dataclasses: the shared settings of a run and each method's own options.

A field is declared once with ``option(default, help, ...)``: its type (checked at construction, so
``refit="False"`` is refused instead of running with the refit on), its allowed values, the subset the
command line offers, when the method reads it, and its help text. ``hf_prune.py``'s flags and
``docs/options.md`` are generated from these fields.
"""
from __future__ import annotations

import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, Callable, ClassVar

# metadata keys of an option field
HELP, CHOICES, CLI_CHOICES, WHEN, ON_CLI, BLOCK_ONLY = "help", "choices", "cli_choices", "when", "on_cli", "block_only"


def option(default: Any, help: str, *, choices: tuple | None = None, cli_choices: tuple | None = None,
           when: tuple[Callable[[Any], bool], str] | None = None, on_cli: bool = True,
           block_only: bool = False) -> Any:
    """A dataclass field with its help text and rules.

    ``choices``: the allowed values (from Python); ``cli_choices``: those the command line offers (the others
    measured worse and stay reachable from Python only); ``when``: (predicate on the options, text) -- the
    field is read only when the predicate holds, and a value off the method's default is refused otherwise;
    ``on_cli``: False keeps the field out of the command line; ``block_only``: read only in block mode.
    """
    metadata = {HELP: help, CHOICES: choices, CLI_CHOICES: cli_choices if cli_choices is not None else choices,
                WHEN: when, ON_CLI: on_cli, BLOCK_ONLY: block_only}
    return field(default=default, metadata=metadata)


def flag(name: str) -> str:
    return f"--{name}"


def _type_name(expected: Any) -> str:
    if expected is bool:
        return "True or False"
    if typing.get_origin(expected) is tuple:
        return "a tuple of numbers"
    return getattr(expected, "__name__", str(expected))


def _conforms(value: Any, expected: Any) -> bool:
    """``value`` is of the declared type (bool is not an int here, an int is a float)."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, each) for each in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        item = typing.get_args(expected)[0]
        return isinstance(value, tuple) and all(_conforms(each, item) for each in value)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True  # a protocol or a callable: not checked here


@dataclass(frozen=True)
class Options:
    """Base of every options dataclass: types and choices are checked at construction, then ``validate``."""

    OWNER: ClassVar[str] = "the settings"  # who reads these options, for error messages

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for each in fields(self):
            value = getattr(self, each.name)
            if isinstance(value, list) and typing.get_origin(hints[each.name]) is tuple:
                object.__setattr__(self, each.name, tuple(value))  # a list from JSON or a comma flag
                value = tuple(value)
            if not _conforms(value, hints[each.name]):
                raise ValueError(f"{flag(each.name)} must be {_type_name(hints[each.name])}, got {value!r} "
                                 f"({type(value).__name__}): pass a {_type_name(hints[each.name])}")
            allowed = each.metadata.get(CHOICES)
            if allowed is not None and value not in allowed:
                raise ValueError(f"unknown {flag(each.name)} {value}: choose from {', '.join(map(str, allowed))}")
        self.validate()

    def validate(self) -> None:
        """Rules across fields (a subclass adds its own); raises ValueError with one line."""

    @classmethod
    def option_fields(cls) -> list[Field]:
        return list(fields(cls))

    @classmethod
    def field_names(cls) -> list[str]:
        return [each.name for each in fields(cls)]


def default_of(each: Field) -> Any:
    return each.default if each.default is not MISSING else each.default_factory()  # type: ignore[misc]


def unread_fields(options: Options, defaults: Options) -> list[tuple[str, str]]:
    """(name, condition) of the fields of ``options`` set off ``defaults`` (a preset's values) and off their class
    defaults that ``options``, as configured, does not read (a ``when`` rule fails, or block-only outside block
    mode)."""
    unread = []
    plain = type(options)()
    for each in fields(options):
        value = getattr(options, each.name)
        if value == getattr(defaults, each.name) or value == getattr(plain, each.name):
            continue
        when = each.metadata.get(WHEN)
        if when is not None and not when[0](options):
            unread.append((each.name, when[1]))
        elif each.metadata.get(BLOCK_ONLY) and getattr(options, "mode", "block") != "block":
            unread.append((each.name, "in block mode"))
    return unread


def refuse_unread(options: Options, defaults: Options, method: str) -> None:
    """One line naming the first option given that the method, as configured, would ignore."""
    unread = unread_fields(options, defaults)
    if unread:
        name, condition = unread[0]
        raise ValueError(f"{flag(name)} is read by --prune_method {method} only {condition}: drop "
                         f"{flag(name)}, or add {condition.removeprefix('with ')}")


def flat_settings(prune_method: str | None = None, drop_unread: dict | tuple = (), **flat: Any):
    """``PruneSettings`` from flat keyword arguments (the command line's, a benchmark's): the shared ones go to
    the settings, the rest to ``prune_method``'s options (a preset's values as its defaults). A name that is
    neither is refused with the method's options. ``drop_unread``: names dropped silently where the method does
    not read them (the calibration counts a benchmark passes to every method)."""
    from pruners.methods import PruneSettings, registered

    shared_names = set(PruneSettings.field_names()) - {"prune_method", "options"}
    entry = registered(prune_method or PruneSettings.prune_method)
    names = set(type(entry.defaults).field_names())
    for name in drop_unread:
        if name in flat and name not in names:
            flat.pop(name)
    unknown = [name for name in flat if name not in names and name not in shared_names]
    if unknown:
        raise ValueError(f"{flag(unknown[0])} is not an option of --prune_method {entry.name}: its options are "
                         f"{', '.join(flag(name) for name in sorted(names))}")
    shared = {name: value for name, value in flat.items() if name in shared_names}
    chosen = {name: value for name, value in flat.items() if name in names}
    unread = unread_fields(replace(entry.defaults, **chosen), entry.defaults)
    dropped = {name for name, _ in unread if name in drop_unread}
    options = entry.options_with({name: value for name, value in chosen.items() if name not in dropped})
    return PruneSettings(prune_method=entry.name, options=options, **shared)

