"""The one rule for what a tool may write over: a table or figure is never replaced by one built
from fewer runs (or from other runs of the same number) unless ``--force`` is given.

Every report the kit writes (``harness.report``'s ``results.md``, ``harness.robustness``'s
``robustness.md``, the benchmarks' ``.md``) ends with one line recording its basis::

    <!-- built from 24 runs; records sha256:1f0c... -->

``runs`` is how many runs (or measurements) the numbers come from; ``records`` a digest of those
runs' summaries (``none`` for a measurement, which is never the same twice). Before a tool writes
a report and the figures and data beside it, ``check`` reads the basis recorded in the report
already there and lets the write go ahead only when

- nothing is there yet, or
- the new report is built from the same records (a redraw: same numbers), or
- it is built from more runs than the one there;

otherwise (fewer runs, other runs of the same number, or a report that records no basis) nothing
is written and the tool stops with one line naming ``--force``. A quick run (``--quick``) writes
``beside`` the full one (``cpu.md`` -> ``cpu-quick.md``), under the same rule. Every file is
written atomically (``write_text``, ``write_bytes``, ``save_figure``): a kill leaves the old file
or the new one.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .checkpoint import _write_atomic, write_text_atomic
from .errors import UsageError

_MARK = re.compile(r"^<!-- built from (\d+) runs?; records (sha256:[0-9a-f]{64}|none) -->$", re.M)


@dataclass(frozen=True)
class Basis:
    """What a report is built from: ``runs`` runs (or measurements) whose records hash to
    ``records`` (None for a fresh measurement: never equal to another)."""

    runs: int
    records: Optional[str] = None

    def line(self) -> str:
        return f"<!-- built from {self.runs} run{'' if self.runs == 1 else 's'}; records {self.records or 'none'} -->"


def basis(records: Iterable[tuple[str, object]]) -> Basis:
    """The basis of a report over ``records``: (name, JSON-able summary) pairs, e.g. each run's
    path relative to the runs folder and its ``summary.json``; the digest ignores their order."""
    items = sorted((str(name), json.dumps(summary, sort_keys=True)) for name, summary in records)
    digest = hashlib.sha256(json.dumps(items).encode()).hexdigest()
    return Basis(len(items), f"sha256:{digest}")


def stamp(text: str, new: Basis) -> str:
    """``text`` (Markdown) ending with the line that records ``new``."""
    return text.rstrip("\n") + "\n\n" + new.line() + "\n"


def recorded(report: Path) -> Optional[Basis]:
    """The basis recorded in ``report`` (its last such line), or None when it records none."""
    try:
        found = _MARK.findall(Path(report).read_text(errors="replace"))
    except OSError:
        return None
    if not found:
        return None
    runs, records = found[-1]
    return Basis(int(runs), None if records == "none" else records)


class Kept(UsageError):
    """A write refused by the rule: the files there are kept (the message names ``--force``)."""


def check(report: Path, new: Basis, force: bool = False, also: Sequence[Path] = ()) -> None:
    """Raise ``Kept`` unless the rule lets a report built on ``new`` replace ``report`` and the
    files ``also`` written with it (figures, data): see the module docstring."""
    report = Path(report)
    there = [p for p in (report, *also) if Path(p).exists()]
    if force or not there:
        return
    old = recorded(report)
    if old is None:
        raise Kept(f"{there[0]} exists and records no basis (runs it was built from): kept it; "
                   "write elsewhere (--out) or pass --force to replace it")
    if new.records is not None and new.records == old.records:
        return
    if new.runs > old.runs:
        return
    runs = lambda n, other="": f"{n}{other} run{'' if n == 1 else 's'}"  # noqa: E731
    raise Kept(f"{report} was built from {runs(old.runs)} and this one from "
               f"{runs(new.runs, ' other' if new.runs == old.runs else '')}: kept it; "
               "write elsewhere (--out) or pass --force to replace it")


def beside(path: Path, tag: str = "quick") -> Path:
    """Where a ``tag`` run writes instead of ``path``: ``cpu.md`` -> ``cpu-quick.md``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (creating its folder); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (creating its folder); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda f: f.write(data))
    return path


def save_figure(fig, path: Path, **savefig_kwargs) -> Path:
    """``fig.savefig`` to ``path`` atomically (the format from the suffix); returns ``path``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **savefig_kwargs)
    return write_bytes(path, buffer.getvalue())
