"""The compression engine: the method registry (each method its options dataclass), estimators, allocators,
actions, the layer pipeline and the record of what was done."""
from pruners.methods import METHODS, Composition, PruneReport, PruneSettings, count_parameters, prune_model
from pruners.options import flat_settings
from pruners.record import ActionRecord, load_record

__all__ = ["METHODS", "ActionRecord", "Composition", "PruneReport", "PruneSettings", "count_parameters",
           "flat_settings", "load_record", "prune_model"]
