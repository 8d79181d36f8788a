"""docs/benchmarks.md's "Latest run" section, rewritten from a run of the whole suite.

The section lies between two markers; everything else in the document (the
method, the targets, the history of the measurements) is kept as written.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import Row, markdown

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:latest:begin -->", "<!-- bench:latest:end -->"


def latest_section(rows: list[Row], header: dict) -> str:
    """The machine, the sizes and the one table of a run, as Markdown."""
    device = header.get("gpu") or header.get("cpu", "")
    lines = [f"## Latest run: {header.get('device', 'cpu').upper()}, {header.get('date', '')}", "",
             f"{device}; " + "; ".join(f"{k} {v}" for k, v in header.items() if k not in ("date", "device", "gpu", "cpu")),
             "", markdown(rows), ""]
    return "\n".join(lines)


def write_docs(rows: list[Row], header: dict, path: Path = DOCS) -> Path:
    """Replace the section between the markers of ``path`` with this run's."""
    text = path.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    path.write_text(text[:start] + "\n" + latest_section(rows, header) + "\n" + text[stop:])
    return path
