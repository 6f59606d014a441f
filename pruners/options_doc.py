"""The options reference, generated from the dataclass fields: ``python -m pruners.options_doc > docs/options.md``.

Also what ``hf_prune.py --help`` groups its flags by: every option field under the options class that
declares it first (block selection, loss allocation, removal, then each method's own).
"""
from __future__ import annotations

import sys
from dataclasses import Field, fields

from pruners.method_options import MethodOptions
from pruners.methods import METHODS, PruneSettings
from pruners.options import CHOICES, CLI_CHOICES, HELP, ON_CLI, WHEN, default_of


def shown(value: object) -> str:
    """A default as a command line spells it."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if value is None:
        return "unset"
    return str(value)


def option_classes() -> list[type[MethodOptions]]:
    """Every options class of the registry and its bases, bases first."""
    found: list[type] = []
    for entry in METHODS.values():
        for cls in reversed(type(entry.defaults).__mro__):
            if issubclass(cls, MethodOptions) and cls not in found:
                found.append(cls)
    return found


def declared_fields(cls: type[MethodOptions]) -> list[Field]:
    """The fields ``cls`` adds to its bases (an override stays with the base that declared the field)."""
    inherited = {each.name for base in cls.__mro__[1:] if issubclass(base, MethodOptions) for each in fields(base)}
    return [each for each in fields(cls) if each.name not in inherited]


def option_groups() -> list[tuple[list[str], list[Field]]]:
    """The options of every method grouped by the methods that have them (in registry order): the fields
    every method has, then those of the block methods, ..., then each method's own."""
    chosen: dict[str, Field] = {}  # one field per name: the first without a ``when`` rule (the general help)
    for entry in METHODS.values():
        for each in fields(entry.defaults):
            if each.name not in chosen or (chosen[each.name].metadata.get(WHEN) and not each.metadata.get(WHEN)):
                chosen[each.name] = each
    groups: dict[tuple[str, ...], list[Field]] = {}
    for name, each in chosen.items():
        having = tuple(method for method, entry in METHODS.items() if name in type(entry.defaults).field_names())
        groups.setdefault(having, []).append(each)
    return sorted(groups.items(), key=lambda group: -len(group[0]))


def methods_title(methods: list[str] | tuple[str, ...]) -> str:
    return "options of every method" if len(methods) == len(METHODS) else f"options of {', '.join(methods)}"


def methods_with(cls: type) -> list[str]:
    return [name for name, entry in METHODS.items() if isinstance(entry.defaults, cls)]


def group_title(cls: type[MethodOptions]) -> str:
    """``flap``, or ``block selection (llm_pruner, flap, ...)`` for a base shared by several methods."""
    if cls.NAME:
        presets = [name for name in methods_with(cls) if name != cls.NAME]
        return cls.NAME + (f" (and its presets {', '.join(presets)})" if presets else "")
    summary = (cls.__doc__ or cls.__name__).strip().split("\n")[0].rstrip(".")
    return f"{summary} ({', '.join(methods_with(cls))})"


def defaults_text(name: str, methods: list[str] | None = None) -> str:
    """The default of option ``name`` across ``methods`` (all that have it): ``128; 512 for flap_refit, ...``."""
    values: dict[str, list[str]] = {}
    for method in methods or list(METHODS):
        options = METHODS[method].defaults
        if name in type(options).field_names():
            values.setdefault(shown(getattr(options, name)), []).append(method)
    if not values:
        return ""
    common = max(values, key=lambda value: len(values[value]))
    others = [f"{value} for {', '.join(names)}" for value, names in values.items() if value != common]
    return "; ".join([common, *others])


def _allowed(each: Field) -> str:
    python, cli = each.metadata.get(CHOICES), each.metadata.get(CLI_CHOICES)
    if python is None:
        return ""
    hidden = [str(value) for value in python if value not in cli]
    return ", ".join(map(str, cli)) + (f" (Python only: {', '.join(hidden)})" if hidden else "")


def _row(each: Field, default: str) -> str:
    notes = []
    if each.metadata.get(WHEN):
        notes.append(f"read only {each.metadata[WHEN][1]}")
    if not each.metadata.get(ON_CLI, True):
        notes.append("Python only")
    help_text = each.metadata.get(HELP, "") + (f" ({'; '.join(notes)})" if notes else "")
    return f"| `{each.name}` | `{default}` | {_allowed(each)} | {help_text} |"


def method_section(name: str) -> list[str]:
    entry = METHODS[name]
    lines = [f"## {name}", "", entry.description + ".", ""]
    if name != entry.base:
        fixed = f"; fixed: {', '.join(f'`{f}`' for f in sorted(entry.fixed))}" if entry.fixed else ""
        lines += [f"A preset of `{entry.base}` ({type(entry.defaults).__name__}){fixed}.", ""]
    else:
        lines += [f"Options class: `{type(entry.defaults).__name__}`; modes: {', '.join(type(entry.defaults).MODES)}.",
                  ""]
    lines += ["| option | default | choices | help |", "|---|---|---|---|"]
    lines += [_row(each, shown(getattr(entry.defaults, each.name))) for each in fields(entry.defaults)]
    return lines + [""]


def generate() -> str:
    """The whole of docs/options.md."""
    lines = ["# Options", "",
             "Generated by `python -m pruners.options_doc > docs/options.md` from the options dataclasses "
             "(`pruners/methods.py`, `pruners/method_options.py`); `tests/test_options.py` checks that it is current.",
             "Flags of `hf_prune.py` are the option names with `--`; `hf_prune.py --prune_method X --help` lists X's.",
             "", "## Shared settings (every method)", "", "| option | default | choices | help |", "|---|---|---|---|"]
    shared = [each for each in fields(PruneSettings) if each.name != "options"]
    lines += [_row(each, shown(default_of(each))) for each in shared] + [""]
    for name in METHODS:
        lines += method_section(name)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(generate())
