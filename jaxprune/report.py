"""What a run leaves for a person to read: results.json, report.md and its figures.

A method returns its report as data (`Report`: a title and sections of
paragraphs, `Table`s and `Figure`s) inside its `MethodResult`; the runner, not
the method, calls `write(run_dir, result)`, which draws the figures and writes
results.json and report.md. `table()` and `fmt()` are the project's one
markdown table writer (bench/ uses them too). Only process 0 writes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Union

from jaxprune.distributed import is_main
from jaxprune.files import write_json_atomic, write_text_atomic

RESULTS, REPORT = "results.json", "report.md"


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list]


@dataclasses.dataclass
class Figure:
    """A PNG in the run folder: `draw(path)` makes it; the report shows it with `caption`."""
    file: str
    caption: str
    draw: Callable[[Path], None]


Block = Union[str, Table, Figure]


@dataclasses.dataclass
class Section:
    title: str
    blocks: list[Block]


@dataclasses.dataclass
class Report:
    title: str
    sections: list[Section]

    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


def fmt(v, digits: int = 2) -> str:
    """A number as a person reads it: thousands separated, `digits` decimals, very small
    values in scientific notation, None as a dash."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2e}" if v and abs(v) < 10 ** -digits else f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table, one line per row, cells through `fmt`."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def markdown(report: Report, seconds: float | None = None) -> str:
    lines = [f"# {report.title}", ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += table(block.header, block.rows)
            elif isinstance(block, Figure):
                lines.append(f"![{block.caption}]({block.file})")
            else:
                lines.append(block)
            lines.append("")
    if seconds is not None:
        lines += [f"Run time: {seconds / 60:.1f} min.", ""]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot drawing to files only (no display on servers and CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write(run_dir, results: dict, report: Report, seconds: float | None = None) -> None:
    """The figures, results.json and report.md into `run_dir` (process 0 only)."""
    if not is_main():
        return
    run_dir = Path(run_dir)
    for figure in report.figures():
        figure.draw(run_dir / figure.file)
    write_json_atomic(run_dir / RESULTS, results)
    write_text_atomic(run_dir / REPORT, markdown(report, seconds))


# What a person finds in a run folder, by name (for the files that are there).
_CONTENTS = {"config.yaml": "the resolved config", "metrics.jsonl": "one line per finished epoch",
             "checkpoints": "checkpoints to continue from"}


def write_stopped(run_dir, message: str) -> None:
    """report.md of a run that stopped before it had results (e.g. a diverged training): the
    message, and what the run folder holds, naming only what is there."""
    if not is_main():
        return
    run_dir = Path(run_dir)
    held = []
    for p in sorted(run_dir.iterdir()):
        if p.name == REPORT or p.name.endswith(".tmp") or (p.is_dir() and not any(p.iterdir())):
            continue
        what = _CONTENTS.get(p.name)
        held.append(f"- `{p.name}{'/' if p.is_dir() else ''}`" + (f": {what}" if what else ""))
    write_text_atomic(run_dir / REPORT, "\n".join(["# Run stopped", "", message, "",
                                                   "The run folder holds:", *held, ""]))
