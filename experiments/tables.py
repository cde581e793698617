"""Tables in README.md and docs/*.md generated from the results files kept in the repository.

    python -m experiments.tables            # rewrite every marked table from its file
    python -m experiments.tables --check    # exit 1 naming each table that no longer matches its file

A generated table sits between two markers; the first names its source, a CSV file under results/ that a
command (shown beside the table in the document) wrote, and the columns to show:

    <!-- table: results/bench/vit_b32_cost/variants.csv cols="label:variant|memory/peak_bytes:peak MiB:mib" -->
    | variant | peak MiB |
    ...
    <!-- /table -->

`cols` lists `key[:header[:format]]` separated by `|` (header: the key; format: `raw`); `rows` keeps the rows
whose first column is one of `a|b|c`, in that order. Formats: raw (as written), mib (bytes / 2**20, one
decimal), gflops (FLOPs / 1e9, two decimals), ms (seconds × 1000, one decimal), pct (a share × 100, one
decimal), x (a ratio, two decimals with a trailing ×), int (thousands separated). Every number a document
shows is then a cell of a file its command wrote, and a stale table fails `make test` (tests/test_tables.py).
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments import REPO_ROOT

__all__ = ["DOCUMENTS", "Table", "find_tables", "render", "stale_tables"]

DOCUMENTS = ("README.md", "docs/results.md", "docs/method.md", "device/README.md")
MARKER = re.compile(r"<!-- table: (?P<spec>.*?) -->\n(?P<body>.*?)<!-- /table -->", re.S)


def _number(cell: object, show: Callable[[float], str]) -> str:
    if cell is None or (isinstance(cell, float) and math.isnan(cell)) or cell == "":
        return ""
    return show(float(cell))  # type: ignore[arg-type]


FORMATS: dict[str, Callable[[object], str]] = {
    "raw": lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v),
    "mib": lambda v: _number(v, lambda x: f"{x / 2**20:.1f}"),
    "gflops": lambda v: _number(v, lambda x: f"{x / 1e9:.2f}"),
    "ms": lambda v: _number(v, lambda x: f"{x * 1e3:.1f}"),
    "pct": lambda v: _number(v, lambda x: f"{x * 100:.1f}"),
    "x": lambda v: _number(v, lambda x: f"{x:.2f}×"),
    "int": lambda v: _number(v, lambda x: f"{x:,.0f}"),
}


@dataclass
class Table:
    """One marked table of a document: its source file, columns (key, header, format) and row selection."""

    source: Path
    columns: list[tuple[str, str, str]]
    rows: list[str] | None
    spec: str

    @classmethod
    def parse(cls, spec: str, root: Path = REPO_ROOT) -> Table:
        words = shlex.split(spec)
        if not words:
            raise ValueError("a table marker needs a source file: <!-- table: results/<...>.csv cols=\"...\" -->")
        options = dict(w.split("=", 1) for w in words[1:])
        unknown = set(options) - {"cols", "rows"}
        if unknown:
            raise ValueError(f"table marker {spec!r}: unknown options {sorted(unknown)}; use cols= and rows=")
        columns = []
        for item in options.get("cols", "").split("|") if "cols" in options else []:
            key, header, fmt = (item.split(":") + [None, None])[:3]
            fmt = fmt or "raw"
            if fmt not in FORMATS:
                raise ValueError(f"table marker {spec!r}: format {fmt!r} of {key!r} is not one of {sorted(FORMATS)}")
            columns.append((key, header or key, fmt))
        rows = options["rows"].split("|") if "rows" in options else None
        return cls(root / words[0], columns, rows, spec)

    def render(self) -> str:
        """The Markdown table of the source file, as the marker asks."""
        if not self.source.is_file():
            raise FileNotFoundError(f"{self.source} (named by the table marker {self.spec!r}) does not exist")
        frame = pd.read_csv(self.source, keep_default_na=False, na_values=[""])
        columns = self.columns or [(c, c, "raw") for c in frame.columns]
        missing = [key for key, _, _ in columns if key not in frame.columns]
        if missing:
            raise KeyError(f"{self.source} has no columns {missing} (it has {list(frame.columns)})")
        if self.rows is not None:
            first = frame.columns[0]
            absent = [r for r in self.rows if r not in set(frame[first].astype(str))]
            if absent:
                raise KeyError(f"{self.source} has no rows {absent} in its column {first!r}")
            frame = pd.concat([frame[frame[first].astype(str) == r] for r in self.rows])
        shown = pd.DataFrame({header: [FORMATS[fmt](v) for v in frame[key]] for key, header, fmt in columns})
        return shown.to_markdown(index=False, disable_numparse=True, colalign=["left"] * len(columns)) + "\n"


def find_tables(text: str, root: Path = REPO_ROOT) -> list[tuple[re.Match[str], Table]]:
    """Every marked table of a document's `text`; sources are relative to `root`."""
    return [(m, Table.parse(m["spec"], root)) for m in MARKER.finditer(text)]


def render(text: str, root: Path = REPO_ROOT) -> str:
    """`text` with every marked table regenerated from its file."""
    out, end = [], 0
    for match, table in find_tables(text, root):
        out += [text[end:match.start("body")], table.render()]
        end = match.end("body")
    return "".join(out) + text[end:]


def stale_tables(root: Path = REPO_ROOT) -> list[str]:
    """'<document>: <source>' for every table that differs from what its file gives."""
    stale = []
    for name in DOCUMENTS:
        path = root / name
        if not path.is_file():
            continue
        for match, table in find_tables(path.read_text(), root):
            if match["body"] != table.render():
                stale.append(f"{name}: {table.source.relative_to(root)}")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.tables", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a table differs from its file")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_tables()
        for line in stale:
            print(f"stale table: {line}. Fix: python -m experiments.tables", file=sys.stderr)
        return 1 if stale else 0
    for name in DOCUMENTS:
        path = REPO_ROOT / name
        if path.is_file():
            text = path.read_text()
            new = render(text)
            if new != text:
                path.write_text(new)
                print(f"updated {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
