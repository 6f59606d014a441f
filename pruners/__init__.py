"""Calibration, importance estimators, budget allocation and the method registry."""
from pruners.methods import METHODS, PruneReport, PruneSettings, count_parameters, prune_model

__all__ = ["METHODS", "PruneReport", "PruneSettings", "count_parameters", "prune_model"]
