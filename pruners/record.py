"""The record of a compression run: every action, in the order it was taken.

Measured allocations (the loss-driven fractions and their curves), removals (elements of a space, whole
layers), factorizations (module, rank, method), value rotations, least-squares refits, bias compensations and
local reconstructions (per layer: epochs, windows, the output error before and after on unseen windows).
It is returned in the report, printed as the per-layer table, saved beside the model as readable JSON
(``compression_record.json``), and read back by recovery, which re-factorizes at the recorded ranks.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from depgraph import Plan

RECORD_FILE = "compression_record.json"
FORMAT = "structprune-record"
VERSION = 1
ACTIONS = ("allocate", "remove", "remove_layers", "factorize", "rotate", "refit", "compensate_bias", "reconstruct")


@dataclass
class ActionRecord:
    """What a method did to a model. Each action is a plain dict with an ``action`` key (one of ``ACTIONS``)."""

    method: str = ""
    actions: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # the settings of the run, as resolved (method defaults in)
    parameters: dict = field(default_factory=dict)  # before, after, budget
    base_model: str = ""  # what was pruned (a name or folder from_pretrained reads): the teacher of distillation

    def add(self, action: str, **fields) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown action '{action}': one of {', '.join(ACTIONS)}")
        self.actions.append({"action": action, **fields})

    def of(self, action: str) -> list[dict]:
        return [entry for entry in self.actions if entry["action"] == action]

    def ranks(self) -> dict[str, int]:
        """Module name -> rank of every factorization (also when the dense product was kept, real_com=False)."""
        return {entry["module"]: entry["rank"] for entry in self.of("factorize")}

    def plan(self) -> Plan:
        """The removals as one ``depgraph.Plan`` (space elements and whole layers)."""
        remove: dict[str, list[int]] = {}
        for entry in self.of("remove"):
            remove.setdefault(entry["space"], []).extend(entry["elements"])
        layers = sorted({layer for entry in self.of("remove_layers") for layer in entry["layers"]})
        return Plan(remove={name: sorted(set(elements)) for name, elements in remove.items()}, layers=layers)

    def layers_touched(self) -> dict[int, list[str]]:
        """Layer index -> the actions taken in it, for the per-layer table."""
        touched: dict[int, list[str]] = {}
        for entry in self.actions:
            if entry.get("layer") is not None:
                touched.setdefault(entry["layer"], []).append(entry["action"])
        return touched

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "method": self.method, "base_model": self.base_model,
                "settings": self.settings, "parameters": self.parameters, "actions": self.actions}

    @classmethod
    def from_dict(cls, data: dict) -> "ActionRecord":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a compression record (format {data.get('format')!r}, expected {FORMAT!r})")
        if data.get("version", 0) > VERSION:
            raise ValueError(f"compression record version {data['version']} is newer than this project reads "
                             f"({VERSION}): upgrade structprune")
        return cls(method=data.get("method", ""), actions=list(data["actions"]), settings=data.get("settings", {}),
                   parameters=data.get("parameters", {}), base_model=data.get("base_model", ""))

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / RECORD_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def load_record(folder: str | os.PathLike) -> ActionRecord | None:
    """The record saved beside a model, or None for a folder saved without one (a dense model, say)."""
    path = Path(folder) / RECORD_FILE
    if not path.exists():
        return None
    return ActionRecord.from_dict(json.loads(path.read_text()))
