"""The compression engine: the method registry, estimators, allocators, actions, the layer pipeline and the
record of what was done."""
from pruners.methods import METHODS, Composition, PruneReport, PruneSettings, count_parameters, prune_model
from pruners.record import ActionRecord, load_record

__all__ = ["METHODS", "ActionRecord", "Composition", "PruneReport", "PruneSettings", "count_parameters",
           "load_record", "prune_model"]
