"""The README and the results pages stay true: every table on docs/results/*.md is what reporting.tables renders
from its CSV, every CSV row says where, when and how it was measured, no page tells history, and every relative
link points at a file (and, into the results pages, at an anchor) that exists."""
import csv
import re
from pathlib import Path

import pytest

from reporting import tables

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PAGES = sorted(RESULTS.glob("*.md"))
CSVS = sorted(RESULTS.glob("*.csv"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
HISTORY = re.compile(r"session|slow day|fast day|issue [0-9]", re.I)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_pages_and_csvs_exist():
    assert PAGES and CSVS
    assert {"ablation.md", "speed.md", "recipes.md"} <= {p.name for p in PAGES}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_marked_table_is_its_csv_rendered(page):
    text = page.read_text(encoding="utf-8")
    marked = list(tables.MARKED_TABLE.finditer(text))
    for m in marked:
        assert m["body"] == tables.render_csv(RESULTS / m["name"]), f"{page.name}: {m['name']} is stale"
    assert text.count("<!-- table:") == len(marked) == text.count("<!-- end table -->")


def test_check_mode_finds_nothing_to_do():
    assert tables.sync(RESULTS, check=True) == []


def test_render_by_hand(tmp_path):
    (tmp_path / "t.csv").write_text(
        "variant,acc,empty,cpu,torch,date,command,anchor\n"
        'a,1.5,,X (AVX2),2.14.1,2026-01-02,"python x.py --k ""a|b""",row-a\n'
        'b,,,X (AVX2),2.14.1,2026-01-03,"python x.py --k ""a|b""",\n', encoding="utf-8")
    assert tables.render_csv(tmp_path / "t.csv") == (
        "| variant | acc | date |\n"
        "|---|---|---|\n"
        '| <a id="row-a"></a>a | 1.5 | 2026-01-02 |\n'
        "| b | — | 2026-01-03 |\n"
        "\n"
        "All rows: cpu X (AVX2); torch 2.14.1; command `python x.py --k \"a\\|b\"`.\n")


def test_main_rewrites_a_stale_page_and_check_fails_until_then(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("k,cpu,torch,date,command\n1,c,2.14.1,2026-01-02,run\n", encoding="utf-8")
    page = tmp_path / "p.md"
    page.write_text("# P\n\n<!-- table: t.csv -->\nold\n<!-- end table -->\ntext\n", encoding="utf-8")
    assert tables.main(["--dir", str(tmp_path), "--check"]) == 1
    assert "old" in page.read_text(encoding="utf-8")
    assert tables.main(["--dir", str(tmp_path)]) == 0
    assert page.read_text(encoding="utf-8") == ("# P\n\n<!-- table: t.csv -->\n| k |\n|---|\n| 1 |\n\n"
                                                "All rows: cpu c; torch 2.14.1; date 2026-01-02; command `run`.\n"
                                                "<!-- end table -->\ntext\n")
    assert tables.main(["--dir", str(tmp_path), "--check"]) == 0


def test_a_missing_csv_is_a_one_line_error(tmp_path):
    (tmp_path / "p.md").write_text("<!-- table: gone.csv -->\n<!-- end table -->\n", encoding="utf-8")
    with pytest.raises(tables.UserError, match="gone.csv does not exist"):
        tables.sync(tmp_path, check=True)


@pytest.mark.parametrize("path", CSVS, ids=lambda p: p.name)
def test_every_row_names_cpu_torch_date_and_command(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        assert set(tables.PROVENANCE) <= set(reader.fieldnames), path.name
    assert rows, path.name
    for i, row in enumerate(rows, start=2):
        assert None not in row and None not in row.values(), f"{path.name}:{i}: ragged row"
        for col in tables.PROVENANCE:
            assert row[col].strip(), f"{path.name}:{i}: empty {col}"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}|unknown", row["date"]), f"{path.name}:{i}: date {row['date']}"
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?|unknown", row["torch"]), f"{path.name}:{i}: torch {row['torch']}"


def test_no_history_words_and_a_short_readme():
    files = [ROOT / "README.md", *sorted((ROOT / "configs").glob("*.yaml")), *DOCS[1:]]
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if HISTORY.search(line)]
    assert hits == []
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 300


def test_config_headers_are_at_most_three_lines():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        header = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
        assert header <= 3, f"{path.name}: {header} header comment lines"


def _anchors(path):
    """Ids a link can point at: <a id="..."> and GitHub's heading slugs."""
    text = path.read_text(encoding="utf-8")
    ids = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#+ (.+)$", _prose(text), re.M):
        ids.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return ids


def _prose(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # links in code blocks are code


def _relative_links(path):
    for target in LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_row_anchors_are_unique_on_a_page(page):
    ids = re.findall(r'<a id="([^"]+)"', page.read_text(encoding="utf-8"))
    assert sorted(i for i in set(ids) if ids.count(i) > 1) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(doc):
    for target in _relative_links(doc):
        file = target.split("#", 1)[0]
        assert (doc.parent / file).exists() if file else True, f"{doc.name}: broken link {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_anchors_into_the_docs_exist(doc):
    for target in _relative_links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file) if file else doc
        if anchor and dest.suffix == ".md" and dest.exists():
            assert anchor in _anchors(dest), f"{doc.name}: no anchor #{anchor} in {dest.name}"
