"""Result tables are data: each table on a page under docs/results/ is rendered from a CSV beside it.

A page marks a table with `<!-- table: NAME.csv -->` and `<!-- end table -->`; everything between the two is
what `render_csv(NAME.csv)` returns. `python -m reporting.tables` rewrites the marked tables of every page from
their CSVs; `--check` rewrites nothing and exits 1 when a page is out of date or a CSV is on no page.
"""
import argparse
import csv
import re
import sys
from pathlib import Path

from utils.errors import UserError, run_cli
from utils.flags import BoolFlag

RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "results"
# Every row names where and how it was measured (the commit is optional); a provenance column with one value
# for all rows is stated once under the table instead of in every row.
PROVENANCE = ("cpu", "torch", "date", "command")
SHARED_ONCE = PROVENANCE + ("commit",)
ANCHOR = "anchor"  # optional column: an id that links can point at (page.md#id), put on the row's first cell
MARKED_TABLE = re.compile(r"(<!-- table: (?P<name>[^\s]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def read_csv(path):
    """(column names, rows as dicts of str) of a CSV file with a header line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"table {path} does not exist; add the CSV or fix the page's table marker")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    if not columns:
        raise UserError(f"table {path} is empty; its first line names the columns")
    ragged = [i + 2 for i, row in enumerate(rows) if None in row or None in row.values()]
    if ragged:
        raise UserError(f"table {path}: line {ragged[0]} has a different number of cells than the header")
    return columns, rows


def _cell(text, column):
    text = " ".join(text.split())  # a Markdown table cell is one line
    if not text:
        return "—"
    if column == "command" and not text.startswith("unknown"):
        text = f"`{text}`"
    return text.replace("|", "\\|")


def _row(row, shown):
    cells = [_cell(row[c], c) for c in shown]
    anchor = row.get(ANCHOR, "").strip()
    if anchor:
        cells[0] = f'<a id="{anchor}"></a>{cells[0]}'
    return "| " + " | ".join(cells) + " |"


def render_rows(columns, rows):
    """Markdown for one table: empty columns left out, provenance shared by all rows stated once below it."""
    columns = [c for c in columns if c != ANCHOR and any(row[c].strip() for row in rows)]
    shared = [c for c in SHARED_ONCE if c in columns and len({row[c].strip() for row in rows}) == 1]
    shown = [c for c in columns if c not in shared]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += [_row(row, shown) for row in rows]
    if shared:
        lines += ["", "All rows: " + "; ".join(f"{c} {_cell(rows[0][c], c)}" for c in shared) + "."]
    return "\n".join(lines) + "\n"


def render_csv(path):
    """The Markdown table of the CSV at `path`."""
    return render_rows(*read_csv(path))


def update_page(text, directory):
    """`text` with every marked table re-rendered from its CSV in `directory`; (new text, CSV names used)."""
    used = []

    def table(m):
        used.append(m["name"])
        return m.group(1) + render_csv(Path(directory) / m["name"]) + m.group(4)

    return MARKED_TABLE.sub(table, text), used


def sync(directory, check=False):
    """Re-render the marked tables of every page in `directory`; returns the problems found (empty: in date).

    With `check` nothing is written and a page whose tables differ from their CSVs is a problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"results directory {directory} does not exist; pass --dir")
    problems, used = [], set()
    for page in sorted(directory.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        new, names = update_page(text, directory)
        used.update(names)
        if new != text:
            if check:
                problems.append(f"{page}: tables differ from their CSVs; run python -m reporting.tables")
            else:
                page.write_text(new, encoding="utf-8")
    problems += [f"{csv_path}: on no page; add <!-- table: {csv_path.name} --> to one"
                 for csv_path in sorted(directory.glob("*.csv")) if csv_path.name not in used]
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description="Regenerate the Markdown tables of docs/results/*.md from their CSVs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", default=str(RESULTS_DIR), help="folder of the result pages and their CSVs")
    p.add_argument("--check", action=BoolFlag, help="write nothing; exit 1 if a page is out of date")
    args = p.parse_args(argv)
    problems = sync(args.dir, check=args.check)
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
