"""Step-size robustness: the best validation metric against multiples of the tuned step size.

    python -m harness.robustness <exp> [--optimizers adam cd ...] [--seeds 1337 1338 1339]
        [--points 7 | --multipliers 0.1 1 10] [--budget sweep|paper] [--config FILE] [--set KEY=VALUE ...]
        [--metric loss|acc] [--root runs/robustness] [--out DIR] [--shard K/N] [--threads N] [--plot-only]
        [--force]

For each optimizer the step size (``h`` for CD/iKFAD/CADAM/LDHD, ``lr`` for
Adam/mSGD) is set to ``multiplier x`` its tuned value in ``<exp>/configs/best.yaml``,
every other hyperparameter stays at its tuned value, and the experiment runs
for each seed as an ordinary run directory
``runs/robustness/<exp>/<optimizer>/x<multiplier>/seed<S>`` (one subprocess per
run; finished runs are skipped, interrupted ones resume). The default grid is
7 points log-spaced from 0.1x to 10x. The budget defaults to the experiment's
sweep budget (``budget`` in ``configs/space.yaml``, the budget the tuned values
were chosen for); ``--budget paper`` uses the full protocol. ``--threads`` sets each
run's CPU threads (``OMP_NUM_THREADS``): N shards on one machine's CPUs need cores/N each.

It then draws ``robustness.png`` (best validation metric against the
multiplier on a log axis, one curve per optimizer, mean +- std over the seeds
that did not diverge; an ``x`` at the top of the axis marks a multiplier at
which a seed diverged) and writes ``robustness.md`` (the same numbers as a
table) in ``<root>/<exp>/`` or ``--out``, where a table built from more runs (or other runs)
is kept unless ``--force`` is given (``harness.outputs``, harness/README.md). ``--plot-only
--root`` also takes a folder that holds ``<optimizer>/x<m>/seed<S>`` itself, e.g. the records
committed in ``results/robustness/<exp>/runs``.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

import optimizers

from . import outputs, processes
from .config import read_yaml
from .cpu import thread_env
from .errors import UsageError, command
from .experiments import Experiment, experiment, paper_seeds, train_command
from .report import label
from .rundir import FINISHED, SUMMARY, RunDir, check_folder
from .signals import EXIT_INTERRUPTED, Interrupted, StopFlag
from .sweep.space import budget_sets, load_space, set_arg


def step_size_name(optimizer: str) -> str:
    """The hyperparameter that plays the step size: ``lr`` for Adam/mSGD, ``h`` for the rest."""
    return optimizers.info(optimizer).step_size


def log_grid(points: int, low: float = 0.1, high: float = 10.0) -> list[float]:
    """``points`` multipliers log-spaced from ``low`` to ``high``, to 3 significant digits."""
    if points < 1:
        raise UsageError(f"--points must be at least 1, got {points}")
    if points == 1:
        return [1.0]
    return [float(f"{m:.3g}") for m in np.logspace(math.log10(low), math.log10(high), points)]


def mult_dir(multiplier: float) -> str:
    return f"x{multiplier:.3g}"


def plan(exp: Experiment, optimizers_: Sequence[str], seeds: Sequence[int], multipliers: Sequence[float],
         root: Path) -> list[dict]:
    """Every run of the scan: optimizer, multiplier, seed, the step size and its run directory."""
    best = read_yaml(exp.configs / "best.yaml")
    runs = []
    for name in optimizers_:
        hp = step_size_name(name)
        tuned = (best.get(name) or {}).get(hp)
        if tuned is None:
            tuned_ok = sorted(n for n, e in best.items() if isinstance(e, dict) and step_size_name(n) in e)
            raise UsageError(f"{exp.configs / 'best.yaml'} has no tuned {hp} for {name}; "
                             f"valid optimizers: {', '.join(tuned_ok)}")
        for m in multipliers:
            for seed in seeds:
                runs.append({"optimizer": name, "multiplier": m, "seed": int(seed), "hp": hp,
                             "value": float(tuned) * m, "dir": root / exp.name / name / mult_dir(m) / f"seed{seed}"})
    return runs


def run_scan(exp: Experiment, runs: list[dict], config: Optional[str], sets: Sequence[str],
             threads: Optional[int] = None) -> int:
    """Run every run not finished yet, one subprocess at a time on ``threads`` CPU threads (None:
    inherited); returns how many crashed.

    Raises UsageError when a run cannot start (bad config, missing data) and Interrupted when
    a signal stopped the scan (the run in flight checkpointed: re-run the command to continue)."""
    todo = [r for r in runs if not RunDir(r["dir"]).finished()]
    crashed = 0
    with StopFlag() as signals, processes.progress_bar(total=len(runs), initial=len(runs) - len(todo),
                                                       desc=f"{exp.name} robustness") as progress:
        for r in todo:
            if signals.flag:  # a signal between two runs
                raise Interrupted(f"{exp.name} robustness: interrupted between runs")
            cmd = train_command(exp, r["optimizer"], r["seed"], r["dir"], config,
                                [*sets, set_arg(f"optimizer.{r['hp']}", r["value"])])
            run = RunDir(r["dir"])
            proc = processes.start(cmd, run.log_file, thread_env(threads))
            signals.child = proc
            rc = proc.wait()
            signals.child = None
            if rc == EXIT_INTERRUPTED or signals.flag:
                raise Interrupted(f"{r['dir']}: interrupted")
            if rc == 2:
                raise UsageError(f"{r['dir']} could not start: {processes.last_line(run.log_file)}")
            if rc != 0:
                crashed += 1
                progress.write(f"{r['dir']}: exited with status {rc}: {processes.last_line(run.log_file)}")
            else:
                progress.write(f"{r['dir']}: {run.status()}")
            progress.update(1)
    return crashed


def collect(exp_root: Path, metric: str = "loss", summaries: Optional[list] = None) -> dict:
    """``{optimizer: {"hp": name, "tuned": value, "points": {multiplier: [(status, best, seed), ...]}}}`` from
    the finished runs under ``<root>/<exp>/<optimizer>/x<m>/seed<S>`` (``summaries``, when given,
    gets each one's path under ``exp_root`` and summary: the report's basis)."""
    import optimizers

    out: dict = {}
    for summary_path in sorted(Path(exp_root).glob(f"*/x*/seed*/{SUMMARY}")):
        run = RunDir(summary_path.parent)
        summary = run.summary() or {}
        try:
            multiplier = float(run.path.parent.name[1:])
        except ValueError:
            continue
        status, name = summary.get("status"), run.path.parent.parent.name
        if status not in FINISHED or name not in optimizers.NAMES:
            continue
        if summaries is not None:
            summaries.append((run.path.relative_to(exp_root).as_posix(), summary))
        entry = out.setdefault(name, {"hp": step_size_name(name), "tuned": None, "points": defaultdict(list)})
        value = (summary.get("hyperparameters") or {}).get(entry["hp"])
        if entry["tuned"] is None and isinstance(value, (int, float)):
            entry["tuned"] = value / multiplier
        best = run.best("val", metric, "min" if metric == "loss" else "max")
        entry["points"][multiplier].append((status, None if best is None else float(best[metric]),
                                            summary.get("seed")))
    return out


def _summarise(points: list[tuple]) -> tuple[Optional[float], Optional[float], int, int]:
    """(mean, std, runs that did not diverge, diverged runs) of one multiplier; ``points`` are
    ``(status, best)`` or ``(status, best, seed)``."""
    ok = [v for s, v, *_ in points if s == "completed" and v is not None]
    diverged = sum(1 for s, v, *_ in points if s == "diverged" or v is None)
    if not ok:
        return None, None, 0, diverged
    return float(np.mean(ok)), float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0, len(ok), diverged


def plot(results: dict, path: Path, metric: str, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not results:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    diverged = []  # (multipliers, colour, curve index) drawn once the y range is known
    for k, name in enumerate(sorted(results, key=optimizers.sort_key)):
        xs, means, stds, div = [], [], [], []
        for m in sorted(results[name]["points"]):
            mean, std, n_ok, n_div = _summarise(results[name]["points"][m])
            if mean is not None:
                xs.append(m), means.append(mean), stds.append(std)
            if n_div:
                div.append(m)
        bars = ax.errorbar(xs, means, yerr=stds, marker="o", ms=4, capsize=3, label=label(name))
        if div:
            diverged.append((div, bars[0].get_color(), k))
    if diverged:
        # A band above the curves, x in data and y in axes coordinates, one row per optimizer.
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.15 * (hi - lo))
        for div, color, k in diverged:
            ax.scatter(div, [0.975 - 0.015 * k] * len(div), marker="x", s=36, color=color,
                       transform=ax.get_xaxis_transform(), clip_on=False, zorder=3)
    ax.set_xscale("log")
    ax.axvline(1.0, color="0.6", ls=":", lw=1)
    ax.set_xlabel("step size / tuned step size (h; lr for Adam and mSGD)")
    ax.set_ylabel(f"best val {metric}")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    if diverged:
        handles.append(Line2D([], [], marker="x", ls="", color="0.3"))
        labels.append("diverged (a seed)")
    ax.legend(handles, labels, fontsize=8, ncol=2)
    fig.tight_layout()
    outputs.save_figure(fig, path, dpi=120)
    plt.close(fig)
    return True


def table(results: dict, metric: str) -> str:
    mults = sorted({m for r in results.values() for m in r["points"]})
    head = ["optimizer", "step size", "tuned"] + [f"{m:.3g}x" for m in mults]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fullest = max(len(p) for r in results.values() for p in r["points"].values())
    for name in sorted(results, key=optimizers.sort_key):
        r = results[name]
        cells = [label(name), r["hp"], f"{r['tuned']:.4g}" if r["tuned"] is not None else "–"]
        for m in mults:
            if m not in r["points"]:
                cells.append("–")
                continue
            mean, std, n_ok, n_div = _summarise(r["points"][m])
            text = "diverged" if mean is None else (f"{mean:.4f}" if n_ok == 1 else f"{mean:.4f} ± {std:.4f}")
            seeds = [p[2] for p in r["points"][m] if len(p) > 2 and p[2] is not None
                     and (p[0] == "diverged" or p[1] is None)]
            named = f": seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" if seeds else ""
            if mean is not None and n_div:
                text += f" ({n_div}/{n_ok + n_div} diverged{named})"
            elif named:
                text += f" ({named[2:]})"
            elif not n_div and n_ok < fullest:  # e.g. one seed where the table's other cells have three
                text += f" ({n_ok} seed{'s' if n_ok > 1 else ''})"
            cells.append(text)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def experiment_root(root: Path, exp_name: str) -> Path:
    """The folder of ``exp_name``'s scan under ``root``: ``<root>/<exp>``, or ``root`` itself when it
    holds the runs directly (``<optimizer>/x<m>/seed<S>``: e.g. the records committed under
    ``results/robustness/<exp>/runs``)."""
    root = Path(root)
    if not (root / exp_name).is_dir() and next(root.glob(f"*/x*/seed*/{SUMMARY}"), None) is not None:
        return root
    return root / exp_name


def render(exp_name: str, exp_root: Path, out: Path, metric: str = "loss", force: bool = False) -> list[Path]:
    """``robustness.png`` and ``robustness.md`` in ``out`` from the runs under ``exp_root``; a
    table built from more runs (or other runs) is kept unless ``force`` (``harness.outputs``)."""
    summaries: list = []
    results = collect(exp_root, metric, summaries)
    if not results:
        raise UsageError(f"no finished robustness runs under {exp_root}; run `bash scripts/robustness.sh {exp_name}`")
    figure, md = out / "robustness.png", out / "robustness.md"
    new = outputs.basis(summaries)
    outputs.check(md, new, force, [figure])
    out.mkdir(parents=True, exist_ok=True)
    written = [figure] if plot(results, figure, metric, f"{exp_name}: step-size robustness") else []
    outputs.write_text(md, outputs.stamp(
        f"# {exp_name}: step-size robustness\n\n"
        f"Best validation {metric} (mean ± std over seeds that did not diverge) with the step size "
        f"at a multiple of its tuned value and every other hyperparameter tuned; runs under `{exp_root}`. "
        f"A cell names how many of its seeds diverged, and which; the mean leaves them out (the "
        f"authors' release keeps training through a NaN, so its means would include them). A cell "
        f"with fewer seeds than the fullest says how many it has.\n\n"
        + table(results, metric) + "\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in written), new))
    return written + [md]


def parse_shard(text: Optional[str]) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard expects K/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= k < n:
        raise UsageError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def scan(spec: str, optimizers_: Optional[Iterable[str]] = None, seeds: Optional[Iterable[int]] = None,
         multipliers: Optional[Iterable[float]] = None, points: int = 7, budget: str = "sweep",
         config: Optional[str] = None, sets: Iterable[str] = (), metric: str = "loss",
         root: str | Path = "runs/robustness", out: Optional[str | Path] = None, shard: Optional[str] = None,
         plot_only: bool = False, force: bool = False, threads: Optional[int] = None) -> list[Path]:
    """Run (the shard of) the scan, each run on ``threads`` CPU threads (None: inherited), then
    render it; returns the files written."""
    from . import config as config_lib

    exp = experiment(spec)
    root = Path(root)
    check_folder(root, "--root")
    if out:
        check_folder(out, "--out")
    if metric not in ("loss", "acc"):
        raise UsageError(f"--metric must be loss or acc, got {metric!r}")
    if not plot_only:
        best = read_yaml(exp.configs / "best.yaml")
        names = [n.lower() for n in (optimizers_ or [n for n, e in best.items() if isinstance(e, dict)])]
        seeds = [int(s) for s in (seeds or paper_seeds(exp)[:3])]
        mults = [float(m) for m in multipliers] if multipliers else log_grid(points)
        if any(m <= 0 for m in mults):
            raise UsageError(f"--multipliers must be positive, got {mults}")
        if budget not in ("sweep", "paper"):
            raise UsageError(f"--budget must be sweep or paper, got {budget!r}")
        if threads is not None and threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        run_sets = list(sets)
        if budget == "sweep" and (exp.configs / "space.yaml").is_file():
            run_sets = budget_sets(load_space(exp)["budget"], config) + run_sets
        for name in names:  # bad keys fail once, here
            config_lib.resolve(exp.name, name, seeds[0], config, run_sets, exp.configs)
        k, n = parse_shard(shard)
        runs = plan(exp, names, seeds, mults, root)[k::n]
        crashed = run_scan(exp, runs, config, run_sets, threads)
        if crashed:
            print(f"{crashed} run(s) crashed; see their train.log", file=sys.stderr)
    exp_root = experiment_root(root, exp.name) if plot_only else root / exp.name
    return render(exp.name, exp_root, Path(out) if out else exp_root, metric, force)


@command
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.robustness", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="experiment folder (nano, vit, ...; bert/sst2 for a task)")
    p.add_argument("--optimizers", nargs="+", default=None, help="default: every optimizer in best.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the first 3 paper seeds")
    p.add_argument("--multipliers", nargs="+", type=float, default=None, help="explicit step-size multipliers")
    p.add_argument("--points", type=int, default=7, help="log grid from 0.1x to 10x (default 7 points)")
    p.add_argument("--budget", default="sweep", choices=("sweep", "paper"),
                   help="sweep: space.yaml's budget (default); paper: the full protocol")
    p.add_argument("--config", default=None, help="YAML applied to every run")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable)")
    p.add_argument("--metric", default="loss", choices=("loss", "acc"), help="validation metric to plot")
    p.add_argument("--root", default="runs/robustness",
                   help="where the run directories go (<root>/<exp>/...); with --plot-only also a folder holding "
                        "<optimizer>/x<m>/seed<S> itself, e.g. results/robustness/nano/runs")
    p.add_argument("--out", default=None, help="folder for robustness.png/.md (default <root>/<exp>)")
    p.add_argument("--shard", default=None, help="K/N: run only every N-th run from the K-th (parallel workers)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (OMP_NUM_THREADS; default: inherited, else every core); "
                        "N shards on one machine's CPUs: cores/N each")
    p.add_argument("--plot-only", action="store_true", help="only draw the figure and table from existing runs")
    p.add_argument("--force", action="store_true",
                   help="replace a table built from more runs or other runs (harness/README.md: outputs)")
    args = p.parse_args(argv)
    for path in scan(args.experiment, args.optimizers, args.seeds, args.multipliers, args.points, args.budget,
                     args.config, args.sets, args.metric, args.root, args.out, args.shard, args.plot_only,
                     args.force, args.threads):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
