"""Regenerate the generated blocks of README.md from the committed results.

    python scripts/update_readme.py

* between ``<!-- performance:start -->`` and ``<!-- performance:end -->``: the tables of
  ``benchmarks/render_results.py`` over benchmarks/results/*.json (dry runs, ``dry_run: true``, left
  out: a CPU dry run's numbers mean nothing);
* between ``<!-- bise-results:start -->`` and ``<!-- bise-results:end -->``: docs/results.md
  (written by scripts/bise_results.py) without its title.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import render_results  # noqa: E402


def _replace(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> block")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def rendered(text: str) -> str:
    """README.md ``text`` with its generated blocks rendered from the committed results."""
    text = _replace(text, "performance", render_results.render(
        render_results.load(sorted(render_results.RESULTS.glob("*.json")))))
    results = ROOT / "docs" / "results.md"
    body = results.read_text().split("\n", 1)[1].replace("\n## ", "\n### ") if results.is_file() else \
        "_No results yet: run `python scripts/bise_results.py`._"
    return _replace(text, "bise-results", body)


def main() -> None:
    readme = ROOT / "README.md"
    text = rendered(readme.read_text())
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, readme)
    print(f"-> {readme}")


if __name__ == "__main__":
    main()
