"""Dependency-graph discovery and physical pruning of causal language models.

    graph = DependencyGraph.build(model)      # trace + group discovery
    print(graph.summary())
    graph.apply(Plan(remove={"model.layers.3.mlp:channels": [0, 5, 7]}))
"""
from depgraph.apply import InvalidPlan, Plan
from depgraph.architectures import ArchitectureRule, MissingArchitectureRule, RULES, rule_for
from depgraph.graph import DependencyGraph, build_graph
from depgraph.groups import Group, ParameterSlice, Space
from depgraph.trace import MissingOpRule

__all__ = [
    "ArchitectureRule", "DependencyGraph", "Group", "InvalidPlan", "MissingArchitectureRule", "MissingOpRule",
    "ParameterSlice", "Plan", "RULES", "Space", "build_graph", "rule_for",
]
