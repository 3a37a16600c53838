"""Render the measured-figure tables of the docs from docs/results.yaml.

Every measured figure the docs quote is kept once, in ``docs/results.yaml``: a list of
``figures`` (id, what, metric, value, command, commit, date, table, ...) and the layout of the
``tables`` that show them. In README.md, docs/*.md and bench/README.md, each block between

    <!-- results:NAME -->
    <!-- /results:NAME -->

is replaced by the generated markdown table NAME. In prefect.yaml, a deployment description line
ending in the comment ``# results: FIGURE-ID`` gets its ``(measured ...)`` part rewritten from that
figure (value, commit), so the durations the Prefect UI shows cannot drift from the docs. A table is either a ``grid`` (a header and
rows of cell templates in which ``{figure-id}`` stands for a formatted figure) or a ``list``
(one row per figure id, showing fields of the record such as what / value / target / met).

    python scripts/render_results.py            # rewrite the blocks in place
    python scripts/render_results.py --check    # exit 1, naming file and table, when out of date

Standard library + PyYAML only; the output is a pure function of the YAML.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

REQUIRED = ("id", "what", "metric", "value", "command", "commit", "date", "table")
FIGURE_REF = re.compile(r"\{([A-Za-z0-9][A-Za-z0-9._@-]*)\}")
BLOCK = re.compile(
    r"(<!-- results:(?P<name>[A-Za-z0-9._-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)",
    re.DOTALL,
)
DOC_GLOBS = ("README.md", "docs/*.md", "bench/README.md")
DEPLOYMENTS = "prefect.yaml"
MEASURED_DESCRIPTION = re.compile(
    r"^(?P<pre>\s*description: .*)\(measured [^()]*\)(?P<post>.*?\s+# results: (?P<id>[A-Za-z0-9][A-Za-z0-9._@-]*)\s*)$",
    re.MULTILINE,
)
LIST_HEADERS = {
    "what": "what",
    "value": "measured",
    "target": "target",
    "met": "met",
    "command": "command",
    "commit": "commit",
    "date": "date",
    "metric": "metric",
}


class ResultsError(ValueError):
    """The YAML is malformed or refers to something that does not exist."""


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "figures" not in data or "tables" not in data:
        raise ResultsError(f"{path}: expected a mapping with 'tables' and 'figures'")
    figures: dict[str, dict] = {}
    for i, fig in enumerate(data["figures"]):
        missing = [k for k in REQUIRED if k not in fig]
        if missing:
            raise ResultsError(f"{path}: figure #{i} ({fig.get('id', '?')}) lacks {missing}")
        if fig["id"] in figures:
            raise ResultsError(f"{path}: figure id {fig['id']!r} appears twice")
        if not isinstance(fig["value"], (int, float)) or isinstance(fig["value"], bool):
            raise ResultsError(f"{path}: figure {fig['id']!r}: value must be a number")
        if fig["table"] not in data["tables"]:
            raise ResultsError(f"{path}: figure {fig['id']!r}: unknown table {fig['table']!r}")
        figures[fig["id"]] = fig
    data["by_id"] = figures
    used: dict[str, set[str]] = {}
    for name, table in data["tables"].items():
        for fid in table_ids(table):
            if fid not in figures:
                raise ResultsError(f"{path}: table {name!r} refers to unknown figure {fid!r}")
            used.setdefault(fid, set()).add(name)
    for fid, fig in figures.items():
        if fig["table"] not in used.get(fid, set()):
            raise ResultsError(f"{path}: figure {fid!r} is not shown in its table {fig['table']!r}")
    return data


def table_ids(table: dict) -> list[str]:
    if table.get("kind", "grid") == "list":
        return list(table["ids"])
    ids = []
    for row in table["rows"]:
        for cell in row:
            ids.extend(FIGURE_REF.findall(str(cell)))
    return ids


def duration(seconds: float) -> str:
    """'2 h 11 min', '11 min 37 s', '8 s': the way the docs write durations."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


def format_value(fig: dict) -> str:
    spec = str(fig.get("format", ""))
    if spec == "duration":
        return duration(fig["value"])
    text = format(fig["value"], spec)
    if "e" in spec:  # 1.2e-07 -> 1.2e-7, as the docs write it
        text = re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2), text)
    if fig.get("std") is not None:
        text += " ± " + format(fig["std"], str(fig.get("std_format", spec.lstrip("+"))))
    if fig.get("minus") == "unicode":
        text = text.replace("-", "−")
    return text


def format_field(fig: dict, field: str) -> str:
    if field == "value":
        text = format_value(fig)
        unit = fig.get("unit")
        if not unit or fig.get("format") == "duration":
            return text
        return f"{text}{unit}" if unit in ("×", "x", "%") else f"{text} {unit}"
    if field == "met":
        met = fig.get("met")
        return "–" if met is None else ("met" if met else "**not met**")
    value = fig.get(field)
    if value is None or value == "":
        return "–"
    if field == "command":
        return f"`{value}`"
    return str(value)


def row_line(cells: list[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def render_table(name: str, data: dict) -> str:
    table = data["tables"][name]
    figures = data["by_id"]
    if table.get("kind", "grid") == "list":
        fields = table.get("columns", ["what", "value", "target", "met"])
        lines = [row_line([LIST_HEADERS.get(f, f) for f in fields]), "|" + "---|" * len(fields)]
        for fid in table["ids"]:
            lines.append(row_line([format_field(figures[fid], f) for f in fields]))
        return "\n".join(lines) + "\n"
    header = [str(h) for h in table["header"]]
    align = table.get("align") or ["---"] * len(header)
    lines = [row_line(header), "|" + "|".join(align) + "|"]
    for row in table["rows"]:
        if len(row) != len(header):
            raise ResultsError(f"table {name!r}: row {row[0]!r} has {len(row)} cells, header {len(header)}")
        cells = [FIGURE_REF.sub(lambda m: format_value(figures[m.group(1)]), str(c)) for c in row]
        lines.append(row_line(cells))
    return "\n".join(lines) + "\n"


def doc_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for pattern in DOC_GLOBS:
        files.extend(sorted(root.glob(pattern)))
    return [f for f in files if f.is_file()]


def render_text(text: str, data: dict, where: str) -> tuple[str, list[str]]:
    """Return (new text, names of the tables whose block changed)."""
    changed: list[str] = []

    def replace(m: re.Match) -> str:
        name = m.group("name")
        if name not in data["tables"]:
            raise ResultsError(f"{where}: block for unknown table {name!r}")
        body = render_table(name, data)
        if m.group("body") != body:
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(replace, text), changed


def render_deployments(text: str, data: dict, where: str) -> tuple[str, list[str]]:
    """prefect.yaml with each marked description's `(measured ...)` rewritten; (text, stale figure ids).
    No colon after `measured`: a colon and a space would end YAML's plain scalar."""
    changed: list[str] = []

    def replace(m: re.Match) -> str:
        fid = m.group("id")
        if fid not in data["by_id"]:
            raise ResultsError(f"{where}: a description refers to unknown figure {fid!r}")
        fig = data["by_id"][fid]
        line = f"{m.group('pre')}(measured {format_field(fig, 'value')} at {fig['commit']}, {fig['date']}){m.group('post')}"
        if line != m.group(0):
            changed.append(f"description ({fid})")
        return line

    return MEASURED_DESCRIPTION.sub(replace, text), changed


def run(root: Path, results: Path, check: bool) -> int:
    data = load(results)
    stale = []
    deployments = root / DEPLOYMENTS
    if deployments.is_file():
        new, changed = render_deployments(deployments.read_text(encoding="utf-8"), data, DEPLOYMENTS)
        stale += [(DEPLOYMENTS, name) for name in changed]
        if changed and not check:
            deployments.write_text(new, encoding="utf-8")
    for path in doc_files(root):
        text = path.read_text(encoding="utf-8")
        new, changed = render_text(text, data, str(path.relative_to(root)))
        rel = path.relative_to(root).as_posix()
        for name in changed:
            stale.append((rel, f"table {name!r}"))
        if changed and not check:
            path.write_text(new, encoding="utf-8")
    for rel, name in stale:
        verb = "is out of date" if check else "rewritten"
        print(f"{rel}: {name} {verb}", file=sys.stderr if check else sys.stdout)
    if check and stale:
        print("run: python scripts/render_results.py", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a block is out of date")
    ap.add_argument("--root", type=Path, default=here, help="repository root (default: this checkout)")
    ap.add_argument("--results", type=Path, default=None, help="figures YAML (default: ROOT/docs/results.yaml)")
    args = ap.parse_args(argv)
    results = args.results if args.results is not None else args.root / "docs" / "results.yaml"
    try:
        return run(args.root, results, args.check)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
