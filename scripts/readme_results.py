#!/usr/bin/env python3
"""Write the README's bench sections from the `kvggml bench` outputs they name.

A section is the lines between `<!-- bench: docs/results/NAME -->` and `<!-- /bench -->`. It
becomes that folder's bench.md (the command that made it and its tables, the headings moved
under the README's) and its plots, so the README shows what the bench wrote and nothing else.

    .venv/bin/python scripts/readme_results.py           rewrite the sections
    .venv/bin/python scripts/readme_results.py --check   exit 1, naming them, if any is stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = re.compile(r"(<!-- bench: (?P<folder>\S+) -->\n)(?P<body>.*?)(<!-- /bench -->)", re.S)
HEADING_LEVELS_BELOW = 2  # bench.md's "## Memory" sits under the README's "### ..." as "#### Memory"


def section(folder: str) -> str:
    """The README text for one bench output folder."""
    path = REPO / folder
    table = path / "bench.md"
    if not table.is_file():
        raise SystemExit(f"README names {folder!r}, which has no bench.md: run kvggml bench --out {folder}")
    lines = table.read_text().splitlines()
    if not lines or lines[0] != "# kvggml bench":
        raise SystemExit(f"{table}: not a kvggml bench table (its first line is not '# kvggml bench')")
    body = [("#" * HEADING_LEVELS_BELOW + line) if line.startswith("#") else line for line in lines[1:]]
    plots = [f"![{png.stem}]({folder}/{png.name})" for png in sorted(path.glob("*.png"))]
    lead = f"Written by `kvggml bench` to [{folder}]({folder}) (bench.json, bench.md, plots):"
    return "\n".join([lead, *body, "", *plots]).strip() + "\n"


def rewrite(readme: str) -> str:
    return SECTION.sub(lambda m: m.group(1) + section(m.group("folder")) + m.group(4), readme)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a section is stale")
    args = parser.parse_args()
    path = REPO / "README.md"
    readme = path.read_text()
    folders = [m.group("folder") for m in SECTION.finditer(readme)]
    if not folders:
        raise SystemExit(f"{path}: no <!-- bench: FOLDER --> ... <!-- /bench --> section")
    new = rewrite(readme)
    if args.check:
        stale = [
            m.group("folder")
            for m, n in zip(SECTION.finditer(readme), SECTION.finditer(new), strict=True)
            if m[0] != n[0]
        ]
        if stale:
            print(
                f"README sections out of date with their bench output: {', '.join(stale)}; "
                "run scripts/readme_results.py",
                file=sys.stderr,
            )
            return 1
        return 0
    path.write_text(new)
    print(f"README: {len(folders)} bench sections written ({', '.join(folders)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
