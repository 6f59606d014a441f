"""``python -m depgraph --model smollm2-135m [--draw_layer 0 --output layer0.png]``: summary and picture."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m depgraph", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, local folder or hub id")
    parser.add_argument("--draw_layer", type=int, default=None, help="draw this decoder layer's groups")
    parser.add_argument("--output", default="layer_groups.png", help="PNG path for --draw_layer")
    args = parser.parse_args(argv)
    from depgraph import DependencyGraph
    from modelio import load_model

    graph = DependencyGraph.build(load_model(args.model))
    print(graph.summary())
    if args.draw_layer is not None:
        print(f"drawn: {graph.draw_layer(args.draw_layer, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
