"""Copy the results tables of bench/results/ into the README, between their markers.

    python bench/update_readme.py
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {"methods": "methods.md", "speed": "speed.md", "recovery": "recovery.md", "scale": "scale.md",
            "selection": "selection.md", "attempts": "attempts.md", "attention_metric": "attention_metric.md"}


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, source in SECTIONS.items():
        path = ROOT / "bench" / "results" / source
        if not path.exists():
            print(f"skipped <!-- {name} -->: {path} is not there yet")
            continue
        table = path.read_text().strip()
        pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README has no <!-- {name} --> ... <!-- /{name} --> markers")
        text = pattern.sub(lambda m: f"<!-- {name} -->\n{table}\n<!-- /{name} -->", text)
    readme.write_text(text)


if __name__ == "__main__":
    main()
