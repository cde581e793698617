"""Tables in README and docs are generated from kept results files (experiments.tables)."""
from pathlib import Path

import pytest

from experiments import REPO_ROOT, tables

CSV = ("label,memory/peak_bytes,flops/train_step,note\n"
       "vanilla,4519362560,3321000000000,dense\nwasi ε=0.8,1776287744,,low rank\n")


def document(spec: str) -> str:
    return f"Before.\n\n<!-- table: {spec} -->\nold\n<!-- /table -->\n\nAfter.\n"


def test_every_table_of_the_documents_matches_its_file():
    assert tables.stale_tables() == []


def test_every_table_names_a_file_kept_in_the_repository():
    for name in tables.DOCUMENTS:
        path = REPO_ROOT / name
        for _, table in tables.find_tables(path.read_text()) if path.is_file() else []:
            assert table.source.is_file() and table.source.is_relative_to(REPO_ROOT / "results"), table.spec


def test_a_table_is_its_file_in_the_asked_columns_units_and_rows(tmp_path: Path):
    (tmp_path / "r.csv").write_text(CSV)
    spec = 'r.csv cols="label:variant|memory/peak_bytes:peak MiB:mib|flops/train_step:GFLOPs:gflops|note" ' \
           'rows="wasi ε=0.8|vanilla"'
    text = tables.render(document(spec), tmp_path)
    # 1776287744 B = 1694.0 MiB, 4519362560 B = 4310.0 MiB; 3321e9 FLOPs = 3321.00 GFLOPs; an empty cell stays empty
    assert text == document(spec).replace("old\n", "| variant    | peak MiB   | GFLOPs   | note     |\n"
                                                  "|:-----------|:-----------|:---------|:---------|\n"
                                                  "| wasi ε=0.8 | 1694.0     |          | low rank |\n"
                                                  "| vanilla    | 4310.0     | 3321.00  | dense    |\n")


def test_a_changed_file_makes_its_table_stale(tmp_path: Path, monkeypatch):
    (tmp_path / "r.csv").write_text(CSV)
    (tmp_path / "README.md").write_text(tables.render(document('r.csv cols="label|note"'), tmp_path))
    monkeypatch.setattr(tables, "DOCUMENTS", ("README.md",))
    assert tables.stale_tables(tmp_path) == []
    (tmp_path / "r.csv").write_text(CSV.replace("low rank", "factored"))
    assert tables.stale_tables(tmp_path) == ["README.md: r.csv"]


@pytest.mark.parametrize("spec, error", [
    ('missing.csv', "does not exist"),
    ('r.csv cols="nope"', "has no columns ['nope']"),
    ('r.csv rows="nope"', "has no rows ['nope']"),
    ('r.csv cols="label:x:furlongs"', "format 'furlongs'"),
    ('r.csv sort=label', "unknown options"),
])
def test_a_marker_that_cannot_be_rendered_says_why(tmp_path: Path, spec: str, error: str):
    (tmp_path / "r.csv").write_text(CSV)
    with pytest.raises((FileNotFoundError, KeyError, ValueError), match=error.replace("[", r"\[").replace("]", r"\]")):
        tables.render(document(spec), tmp_path)
