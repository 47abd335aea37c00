"""Figures and a table from run directories.

    python -m harness.report RUNS_DIR [--out DIR] [--title TEXT]

Finds every run directory under RUNS_DIR (a folder with ``summary.json`` or
``config.yaml``), groups runs by experiment and optimizer (an optimizer run at several
sets of hyperparameters is one group per set, named by the values that differ:
``variants``), and writes to ``--out``
(default ``results/<experiment>``):

- ``<split>_<metric>.png``: the metric against training step, one curve per
  optimizer: the mean over seeds with a +-1 std band when there are several;
- ``results.md``: a table per experiment with best and final validation metrics
  (mean +- std over seeds), test metrics when logged, wall time, and how many runs
  completed, diverged, were interrupted or have no summary (killed before writing
  one, or still going), the diverged seeds with the step each stopped at, and the
  averaging rule in a sentence (``AVERAGING_RULE``).

A folder holding a report built from more runs (or other runs) is kept unless ``--force``
is given: the rule of ``harness.outputs`` (harness/README.md, "What a tool may write over").

Means, stds and curves are over completed runs only: a diverged run's best loss or
an interrupted run's partial curve would mix a different quantity into the mean.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

import optimizers

from . import outputs
from .errors import UsageError, command
from .rundir import RunDir, best_record, check_folder, finite_values



def label(name: str) -> str:
    """The optimizer's display name (the registry's), else ``name`` itself; a group of
    ``variants`` keeps its values: ``cadam0 (h=0.005244)`` is ``CADAM0 (h=0.005244)``."""
    base, sep, values = str(name).partition(" (")
    try:
        return optimizers.info(base).label + sep + values
    except ValueError:
        return name


def order(name: str):
    """The sort key of a group of ``variants``: the registry's order, then the values."""
    return optimizers.sort_key(str(name).partition(" (")[0]), str(name)


def _value(v) -> str:
    return "default" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def variants(runs: list[dict]) -> dict[str, list[dict]]:
    """One experiment's runs by optimizer, and within an optimizer by hyperparameters, so that
    runs at different values (the released and the re-tuned ones, say) are never averaged
    together. A group's key is the optimizer's name, followed, where the optimizer ran at more
    than one set of values, by the values that differ: ``cadam0 (h=0.005244, alpha=0.01198)``."""
    by_name: dict[str, dict[str, tuple[dict, list[dict]]]] = defaultdict(dict)
    for run in runs:
        s = run["summary"]
        values = s.get("hyperparameters") or {}
        by_name[s.get("optimizer", "?")].setdefault(json.dumps(values, sort_keys=True), (values, []))[1].append(run)
    groups = {}
    for name, by_values in by_name.items():
        if len(by_values) == 1:
            groups[name] = next(iter(by_values.values()))[1]
            continue
        keys = dict.fromkeys(k for values, _ in by_values.values() for k in values)  # the runs' order
        differ = [k for k in keys if len({json.dumps(values.get(k)) for values, _ in by_values.values()}) > 1]
        for values, group in by_values.values():
            groups[f"{name} ({', '.join(f'{k}={_value(values.get(k))}' for k in differ)})"] = group
    return groups


NO_SUMMARY = "no summary"  # the status of a run that never wrote one: still going, or killed first
DAMAGED = "damaged records"  # a run whose metrics.jsonl cannot be read


def find_runs(root: Path) -> list[dict]:
    """Every run under ``root``: its summary, records and directory. A run without a readable
    summary (killed before it wrote one, or still going) is there too, with status
    ``NO_SUMMARY`` and its experiment and optimizer from ``config.yaml``; a run whose records
    cannot be read, with status ``DAMAGED`` and a one-line warning."""
    runs = []
    for run in RunDir.find(root, unfinished=True):
        summary = run.summary()
        if summary is None:
            try:
                config = run.config() or {}
            except UsageError as error:
                print(f"skipped {run.path}: no summary, and {error}", file=sys.stderr)
                continue
            opt = config.get("optimizer") or {}
            summary = {"status": NO_SUMMARY, "experiment": config.get("experiment", "?"),
                       "optimizer": opt.get("name", "?"), "seed": config.get("seed"),
                       "hyperparameters": {k: v for k, v in opt.items() if k != "name"}}
        try:
            records = run.records()
        except UsageError as error:  # counted, never averaged: the table says how many
            print(f"warning: {error}", file=sys.stderr)
            summary, records = {**summary, "status": DAMAGED}, []
        runs.append({"dir": run.path, "summary": summary, "metrics": records})
    return runs


def completed(runs: list[dict]) -> list[dict]:
    """The runs whose status is ``completed``: the only ones the means and curves use."""
    return [r for r in runs if r["summary"].get("status") == "completed"]


def status_counts(runs: list[dict]) -> str:
    """E.g. ``completed 2, diverged 1``: how many runs stopped in each way."""
    counts = defaultdict(int)
    for r in runs:
        counts[r["summary"].get("status", "?")] += 1
    order = ["completed", "diverged", "interrupted", NO_SUMMARY, DAMAGED]
    return ", ".join(f"{k} {counts[k]}" for k in sorted(counts, key=lambda k: (order.index(k) if k in order else 9, k)))


def diverged_seeds(runs: list[dict]) -> str:
    """E.g. ``seed 3 (step 1200), seed 7 (step 40)``: the diverged runs and the step each stopped at."""
    marks = []
    for r in runs:
        s = r["summary"]
        if s.get("status") == "diverged":
            name = f"seed {s['seed']}" if s.get("seed") is not None else Path(r["dir"]).name
            step = s.get("steps", max((rec.get("step", 0) for rec in r["metrics"]), default=None))
            marks.append(name + (f" (step {step})" if step is not None else ""))
    return ", ".join(marks) or "–"


# Stated under every table: how the means treat diverged seeds, and what the release's would do.
AVERAGING_RULE = ("Averaging rule: every mean ± std and curve is over the completed seeds only, so a diverged "
                  "seed (its run stopped at a non-finite loss, or at a loss above `train.diverge_factor` x its "
                  "first evaluated one) is counted in `status`, named in `diverged seeds` with the step it "
                  "stopped at, and left out of the means. The authors' release keeps training through a NaN, "
                  "so its means would include such a seed (a NaN loss, chance-level accuracy).")


def _curves(runs: list[dict], split: str, key: str):
    """Steps and an (n_runs, n_steps) array (NaN where a run has no value, e.g. diverged early)."""
    series = []
    for run in runs:
        pts = {r["step"]: r[key] for r in run["metrics"] if r.get("split") == split and key in r}
        series.append({s: (float(v) if isinstance(v, (int, float)) else np.nan) for s, v in pts.items()})
    steps = sorted(set().union(*series)) if series else []
    return np.array(steps), np.array([[s.get(t, np.nan) for t in steps] for s in series])


def _mean_std(values: list[float]) -> str:
    vals = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(vals) == 0:
        return "–"
    return f"{vals.mean():.4f}" if len(vals) == 1 else f"{vals.mean():.4f} ± {vals.std(ddof=1):.4f}"


def _metric(run: dict, split: str, key: str, how: str) -> Optional[float]:
    """A run's best (``how`` = min or max) or final finite ``split`` ``key``, or None."""
    if how == "final":
        values = finite_values(run["metrics"], split, key)
        return values[-1] if values else None
    best = best_record(run["metrics"], split, key, how)
    return None if best is None else float(best[key])


def plot(by_opt: dict[str, list[dict]], split: str, key: str, path: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn, seen = False, []
    for name in sorted(by_opt, key=order):
        steps, values = _curves(by_opt[name], split, key)
        seen.append(values.ravel())
        if len(steps) == 0 or np.isnan(values).all():
            continue
        with np.errstate(all="ignore"):
            mean = np.nanmean(values, axis=0)
            std = np.nanstd(values, axis=0)
        n = len(by_opt[name])
        (line,) = ax.plot(steps, mean, label=f"{label(name)}" + (f" (n={n})" if n > 1 else ""))
        if n > 1:
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"{split} {key}")
    ax.set_title(title)
    if key == "loss":
        finite = np.concatenate(seen)
        finite = finite[np.isfinite(finite)]
        if len(finite):  # the first evaluations sit far above the interesting range
            ax.set_ylim(finite.min() - 0.05 * (np.percentile(finite, 90) - finite.min()), np.percentile(finite, 90))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    outputs.save_figure(fig, path, dpi=120)
    plt.close(fig)
    return True


# What each validation-loss estimator is (``train.eval_batches``, harness/data.py).
ESTIMATORS = {"fresh": "fresh random validation batches at every evaluation (nanoGPT's estimator, the paper's)",
              "fixed": "the same validation batches at every evaluation"}


def estimator_keys(by_opt: dict[str, list[dict]]) -> list[str]:
    """The ``loss_<estimator>`` keys the validation records hold, headline first (the order
    of the runs' ``val_estimators``); empty where each evaluation has one estimator."""
    keys = {k for runs in by_opt.values() for run in runs for r in run["metrics"]
            if r.get("split") == "val" for k in r if k.startswith("loss_")}
    order = next((run["summary"].get("val_estimators") for runs in by_opt.values() for run in runs
                  if run["summary"].get("val_estimators")), [])
    return sorted(keys, key=lambda k: (order.index(k[5:]) if k[5:] in order else len(order), k))


def table(by_opt: dict[str, list[dict]]) -> str:
    splits = sorted({r.get("split") for runs in by_opt.values() for run in runs for r in run["metrics"]} - {None})
    has_acc = any("acc" in r for runs in by_opt.values() for run in runs for r in run["metrics"])
    losses = estimator_keys(by_opt) or ["loss"]
    named = lambda key: "" if key == "loss" else f" ({key[5:]})"
    head = ["optimizer", "runs", *(f"best val loss{named(k)}" for k in losses),
            *(f"final val loss{named(k)}" for k in losses)]
    if has_acc:
        head += ["best val acc", "final val acc"]
    if "test" in splits:
        head += ["final test loss"] + (["final test acc"] if has_acc else [])
    if "test_at_best_val" in splits:  # cifar's second number: the best-validation weights, evaluated on test
        head += ["test acc of the best-val weights"]
    head += ["wall time (s)", "status", "diverged seeds"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(by_opt, key=order):
        everyone = by_opt[name]
        runs = completed(everyone)
        cells = [label(name), str(len(everyone)),
                 *(_mean_std([_metric(r, "val", k, "min") for r in runs]) for k in losses),
                 *(_mean_std([_metric(r, "val", k, "final") for r in runs]) for k in losses)]
        if has_acc:
            cells += [_mean_std([_metric(r, "val", "acc", "max") for r in runs]),
                      _mean_std([_metric(r, "val", "acc", "final") for r in runs])]
        if "test" in splits:
            cells.append(_mean_std([_metric(r, "test", "loss", "final") for r in runs]))
            if has_acc:
                cells.append(_mean_std([_metric(r, "test", "acc", "final") for r in runs]))
        if "test_at_best_val" in splits:
            cells.append(_mean_std([_metric(r, "test_at_best_val", "acc", "final") for r in runs]))
        walls = [r["summary"].get("wall_time_s") for r in runs]
        walls = [w for w in walls if isinstance(w, (int, float))]
        cells.append(_mean_std(walls).split(".")[0] if walls else "–")
        cells += [status_counts(everyone), diverged_seeds(everyone)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\n" + AVERAGING_RULE


def copy_records(root: Path, target: Path) -> list[Path]:
    """Copy each run's small files (config, metrics, summary; never a checkpoint) from under
    ``root`` to ``target/runs/`` at the same relative paths, e.g. to commit a reproduction."""
    written = []
    for run in RunDir.find(root):
        for path in (run.config_file, run.metrics_file, run.summary_file):
            if path.exists():
                written.append(outputs.write_bytes(Path(target) / "runs" / path.relative_to(root),
                                                   path.read_bytes()))
    return written


FIGURES = ("val_loss", "val_acc", "test_acc", "train_loss")  # besides val_loss_<estimator>.png


def runs_basis(root: Path, runs: list[dict]) -> outputs.Basis:
    """The basis of a report (``harness.outputs``): its completed runs (those the means and
    curves use) and their summaries, named by their path under ``root``."""
    return outputs.basis((Path(r["dir"]).relative_to(root).as_posix() if Path(r["dir"]).is_relative_to(root)
                          else str(r["dir"]), r["summary"]) for r in completed(runs))


def report(root: Path, out: Optional[Path] = None, title: Optional[str] = None,
           with_records: bool = False, force: bool = False) -> list[Path]:
    """Write figures and ``results.md`` for the runs under ``root`` (and, ``with_records``,
    a copy of every run's records: ``copy_records``); returns the files written.

    Nothing is written where a report built from more runs (or from other runs) is kept
    (``harness.outputs.check``: a ``Kept`` error naming ``--force``)."""
    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise UsageError(f"no run directories (with config.yaml or summary.json) under {root}")
    per_exp: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        per_exp[run["summary"].get("experiment", "?")].append(run)
    by_exp = {exp: variants(exp_runs) for exp, exp_runs in per_exp.items()}
    targets = {exp: (Path(out) / exp if len(by_exp) > 1 else Path(out)) if out else Path("results") / exp
               for exp in by_exp}
    bases = {exp: runs_basis(root, [r for rs in by_opt.values() for r in rs]) for exp, by_opt in by_exp.items()}
    for exp, target in targets.items():  # every folder passes before anything is written
        outputs.check(target / "results.md", bases[exp], force, [target / f"{f}.png" for f in FIGURES])
    written = []
    for exp, by_opt in sorted(by_exp.items()):
        target = targets[exp]
        target.mkdir(parents=True, exist_ok=True)
        lines = [f"# {title or exp}", "", f"Runs under `{root}`. Means ± std over seeds and the curves use "
                 "completed runs only; `status` counts every run (diverged, interrupted, or with no summary: "
                 "still going or killed before it wrote one).", ""]
        estimators = estimator_keys(by_opt)
        if estimators:
            lines += ["Validation loss estimators: " + "; ".join(
                f"{k[5:]}: {ESTIMATORS.get(k[5:], k[5:])}" for k in estimators)
                + f". `val_loss.png` shows the first ({estimators[0][5:]}).", ""]
        figures = []
        done = {name: completed(runs) for name, runs in by_opt.items() if completed(runs)}
        for split, key in (("val", "loss"), *(("val", k) for k in estimators[1:]), ("val", "acc"), ("test", "acc"),
                           ("train", "loss")):
            path = target / f"{split}_{key}.png"
            if plot(done, split, key, path, f"{title or exp}: {split} {key}"):
                figures.append(path)
                written.append(path)
        lines += [table(by_opt), ""]
        lines += [f"![{p.stem}]({p.name})" for p in figures]
        written.append(outputs.write_text(target / "results.md", outputs.stamp("\n".join(lines), bases[exp])))
    if with_records:
        written += copy_records(root, Path(out) if out else Path("results") / next(iter(by_exp)))
    return written


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/<experiment>)")
    p.add_argument("--title", default=None)
    p.add_argument("--with-records", action="store_true",
                   help="also copy each run's config.yaml, metrics.jsonl and summary.json to <out>/runs/")
    p.add_argument("--force", action="store_true",
                   help="replace a report built from more runs or other runs (harness/README.md: outputs)")
    args = p.parse_args(argv)
    if args.out:
        check_folder(args.out, "--out")
    for path in report(args.runs_dir, args.out, args.title, args.with_records, args.force):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
