"""Iterations per second of whole training runs: adam against each of our optimizers.

    python benchmarks/end_to_end.py                          # nano and owt smoke runs, every optimizer
    python benchmarks/end_to_end.py --experiments nano --optimizers adam,cadam --set train.max_iters=200

Each run is the experiment's own command, in a fresh run directory under a
temporary folder (so nothing is resumed):

    python -m <exp>.train --optimizer NAME --seed S --config <exp>/configs/smoke.yaml --out DIR [--set k=v ...]

and its ``summary.json`` gives ``steps`` and ``wall_time_s``. Iterations per
second are ``steps / wall_time_s``: the whole loop including evaluation and
logging, i.e. what a user of the optimizer waits for. The smoke configs need
their data prepared first (the train script names the command if it is missing).

Writes ``benchmarks/results/end_to_end_<device>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness import outputs  # noqa: E402
from harness.errors import command  # noqa: E402
EXPERIMENTS = ("nano", "owt")
OPTIMIZERS = ("adam", "ldhd", "cd", "ikfad", "cadam")


def run_one(experiment: str, optimizer: str, seed: int, config: Path, sets: list[str], timeout: float) -> dict:
    """One training run in a fresh directory; its summary, or an error line."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", f"{experiment}.train", "--optimizer", optimizer, "--seed", str(seed),
               "--config", str(config), "--out", str(out)]
        for s in sets:
            cmd += ["--set", s]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
        except subprocess.TimeoutExpired:
            return dict(error=f"timed out after {timeout:.0f} s")
        summary_file = out / "summary.json"
        if proc.returncode != 0 or not summary_file.exists():
            lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()
            return dict(error=lines[-1][:160])
        summary = json.loads(summary_file.read_text())
    steps, wall = summary.get("steps"), summary.get("wall_time_s")
    if not steps or not wall:
        return dict(error=f"summary.json lacks steps/wall_time_s: {sorted(summary)}")
    return dict(steps=steps, wall_time_s=wall, its_per_s=steps / wall, status=summary.get("status"),
                device=summary.get("device"))


def markdown(results: dict) -> str:
    lines = [f"# End-to-end smoke training: iterations per second ({results['device']})", "",
             f"{results['date']}; `{results['command']}`", "",
             "Iterations per second = `steps / wall_time_s` from each run's summary.json (the whole loop, "
             "evaluation included); x adam is that over adam's in the same experiment.", ""]
    for exp in results["experiments"]:
        rows = [r for r in results["rows"] if r["experiment"] == exp]
        adam = next((r.get("its_per_s") for r in rows if r["optimizer"] == "adam"), None)
        lines += [f"## {exp}", "", "| optimizer | steps | wall s | it/s | x adam |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['optimizer']} | could not run: {r['error']} | | | |")
                continue
            rel = f"{r['its_per_s'] / adam:.2f}" if adam else ""
            lines.append(f"| {r['optimizer']} | {r['steps']} | {r['wall_time_s']:.1f} | {r['its_per_s']:.1f} | {rel} |")
        lines.append("")
    return "\n".join(lines)


def report_path(out: str, device: str) -> Path:
    return Path(out) / f"end_to_end_{device}.md"


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Smoke-training iterations per second, adam vs ours.")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS), help=f"comma-separated, from {', '.join(EXPERIMENTS)}")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated optimizer names")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--config", default="smoke", help="config name under <exp>/configs/ (default smoke)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="key=value passed to every run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for end_to_end_<device>.md/.json (results there from as many runs or more are kept)")
    p.add_argument("--force", action="store_true", help="replace results there from as many runs or more")
    args = p.parse_args(argv)
    experiments = args.experiments.split(",")
    names = args.optimizers.split(",")
    bad = [e for e in experiments if e not in EXPERIMENTS]
    if bad:
        p.error(f"unknown experiment {', '.join(bad)}; valid: {', '.join(EXPERIMENTS)}")

    import torch

    basis = outputs.Basis(len(experiments) * len(names))
    guess = report_path(args.out, "cuda" if torch.cuda.is_available() else "cpu")  # the runs' device
    outputs.check(guess, basis, args.force, [guess.with_suffix(".json")])  # before the runs, not after
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(experiments) * len(names), desc="training runs", unit="run") as progress:
        for exp in experiments:
            config = ROOT / exp / "configs" / f"{args.config}.yaml"
            for name in names:
                progress.set_postfix_str(f"{exp} {name}")
                if not (ROOT / exp / "train.py").exists():
                    result = dict(error=f"{exp}/train.py does not exist yet")
                elif not config.exists():
                    result = dict(error=f"{config.relative_to(ROOT)} does not exist")
                else:
                    result = run_one(exp, name, args.seed, config, args.sets, args.timeout)
                rows.append(dict(experiment=exp, optimizer=name, **result))
                progress.update(1)
    device = next((r["device"].split(":")[0] for r in rows if r.get("device")), "cpu")
    results = dict(device=device, date=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                   command="python benchmarks/end_to_end.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   experiments=experiments, rows=rows)
    md = report_path(args.out, device)
    outputs.check(md, basis, args.force, [md.with_suffix(".json")])
    outputs.write_text(md.with_suffix(".json"), json.dumps(results, indent=1))
    outputs.write_text(md, outputs.stamp(markdown(results), basis))
    print(markdown(results))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
