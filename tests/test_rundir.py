"""harness.rundir: the run directory's files and the one way its records are read."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import TrainConfig
from harness.errors import UsageError
from harness.rundir import TAIL_BYTES, RunDir, best_record, parse_records

ROOT = Path(__file__).resolve().parents[1]


def train(**keys) -> TrainConfig:
    """A run's train section (the schema ``RunDir.progress`` reads), of one example per step."""
    return TrainConfig(batch_size=1, **keys)


def lines(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def make_run(path: Path, metrics: str, status="completed", optimizer="adam") -> RunDir:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text(metrics)
    (path / "summary.json").write_text(json.dumps({"status": status, "experiment": "nano", "optimizer": optimizer,
                                                   "wall_time_s": 1.0}))
    return RunDir(path)


VAL = [{"step": 0, "split": "val", "loss": 4.0}, {"step": 10, "split": "val", "loss": 3.0},
       {"step": 20, "split": "val", "loss": 3.5}]


def test_a_torn_last_line_is_skipped_and_a_complete_one_kept(tmp_path):
    run = make_run(tmp_path / "run", lines(*VAL) + '{"step": 30, "split": "va')
    assert run.records() == VAL
    assert run.best()["step"] == 10 and run.last_record() == VAL[-1]
    # A last line that is complete but for its newline is a record.
    run.metrics_file.write_text(lines(*VAL[:2]) + json.dumps(VAL[2]))
    assert run.records() == VAL


def test_a_corrupt_line_before_the_last_is_a_one_line_error(tmp_path):
    run = make_run(tmp_path / "run", lines(VAL[0]) + '{"step": 10, "spl\n' + lines(VAL[2]))
    with pytest.raises(UsageError, match=r"metrics.jsonl: line 2 is not a JSON record") as err:
        run.records()
    assert "\n" not in str(err.value)
    # A torn line with its newline (more was appended after a crash) is corrupt too.
    with pytest.raises(UsageError, match="line 2"):
        parse_records(lines(VAL[0]).encode() + b'{"step": 1\n')
    assert parse_records(b"\n" + lines(VAL[0]).encode() + b"\n\n") == [VAL[0]]  # blank lines are no records


def test_an_empty_or_missing_run_reads_as_nothing(tmp_path):
    empty = make_run(tmp_path / "empty", "")
    assert empty.records() == [] and empty.best() is None and empty.last_record() is None
    assert empty.progress(train(max_iters=100)) == 0.0 and empty.status() == "completed" and empty.finished()
    missing = RunDir(tmp_path / "nope")
    assert missing.records() == [] and missing.records_after(0) == ([], 0)
    assert missing.summary() is None and missing.status() is None and not missing.finished()
    assert missing.config() is None and missing.best() is None and missing.progress(train(max_iters=100)) == 0.0
    assert RunDir.find(tmp_path) == [empty]
    assert (missing.config_file.name, missing.checkpoint_file.name, missing.log_file.name) == \
        ("config.yaml", "checkpoint.pt", "train.log")


def test_best_is_the_best_finite_record(tmp_path):
    # The log writes non-finite numbers as strings; a NaN literal (JSON's extension) counts as not finite too.
    text = lines({"step": 0, "split": "val", "loss": "nan", "acc": 0.1},
                 {"step": 5, "split": "train", "loss": 0.5},
                 {"step": 10, "split": "val", "loss": 2.0, "acc": 0.7},
                 {"step": 15, "split": "val", "loss": 2.0, "acc": "inf"}) + '{"step": 20, "split": "val", "loss": NaN}\n'
    run = make_run(tmp_path / "run", text)
    assert math.isnan(run.records()[-1]["loss"])
    assert run.best("val", "loss", "min")["step"] == 10  # the first of equal values; NaN never wins
    assert run.best("val", "acc", "max")["step"] == 10
    assert run.best("train", "loss")["step"] == 5 and run.best("test", "loss") is None
    assert best_record([{"split": "val", "loss": "nan"}, {"split": "val", "loss": float("inf")}], "val", "loss") is None
    with pytest.raises(ValueError, match="mode must be min or max"):
        run.best("val", "loss", "final")


def test_progress_reads_only_the_tail(tmp_path):
    filler = [{"step": i, "split": "train", "loss": 1.0, "pad": "x" * 100} for i in range(100)]
    text = '{"corrupt\n' + lines(*filler)  # a corrupt first line that the tail never reaches
    run = make_run(tmp_path / "run", text + '{"step": 100, "spl')
    assert len(text) > 2 * TAIL_BYTES
    with pytest.raises(UsageError):
        run.records()
    assert run.last_record()["step"] == 99
    assert run.progress(train(max_iters=198)) == pytest.approx(0.5)
    run.metrics_file.write_text(lines({"step": 7, "split": "val", "loss": 1.0, "epoch": 3}))
    assert run.progress(train(epochs=4, max_iters=1000)) == pytest.approx(0.75)
    assert run.progress(train(max_iters=5)) == 1.0


def test_records_after_leaves_an_unfinished_line_for_the_next_look(tmp_path):
    run = make_run(tmp_path / "run", lines(VAL[0]) + '{"step": 10, "split": "val"')
    first, offset = run.records_after(0)
    assert first == [VAL[0]] and offset == len(lines(VAL[0]))
    run.metrics_file.write_text(lines(VAL[0], VAL[1]))
    assert run.records_after(offset) == ([VAL[1]], len(lines(VAL[0], VAL[1])))
    run.metrics_file.write_text(lines(VAL[0]))  # a resumed run truncated the file: read from the start
    assert run.records_after(10_000) == ([VAL[0]], len(lines(VAL[0])))


def test_report_draws_a_run_whose_last_line_is_torn(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        make_run(runs / "adam" / f"seed{seed}", lines(*VAL) + '{"step": 30, "split": "val", "lo')
    proc = subprocess.run([sys.executable, "-m", "harness.report", str(runs), "--out", str(tmp_path / "results")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| Adam | 2 | 3.0000 ± 0.0000 | 3.5000 ± 0.0000 |" in table
    assert (tmp_path / "results" / "val_loss.png").stat().st_size > 0


def test_report_counts_each_status_and_averages_completed_runs_only(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs / "adam" / "seed1", lines(*VAL))
    make_run(runs / "adam" / "seed2", lines(*VAL[:2], {"step": 20, "split": "val", "loss": 2.0}))
    # A finite blow-up, an interrupted run and a run killed before its summary: none of them is
    # averaged with the completed runs, all of them are counted.
    make_run(runs / "adam" / "seed3", lines(VAL[0], {"step": 10, "split": "val", "loss": 0.5}), "diverged")
    make_run(runs / "adam" / "seed4", lines(VAL[0], {"step": 10, "split": "val", "loss": 0.1}), "interrupted")
    killed = runs / "adam" / "seed5"
    killed.mkdir(parents=True)
    (killed / "config.yaml").write_text("experiment: nano\nseed: 5\noptimizer: {name: adam}\n")
    (killed / "metrics.jsonl").write_text(lines(VAL[0], {"step": 10, "split": "val", "loss": 0.01}))
    make_run(runs / "cd" / "seed1", lines(VAL[0]), "diverged", optimizer="cd")
    make_run(runs / "cd" / "seed2", "not a record\n" + lines(VAL[0]), optimizer="cd")  # damaged: counted, warned
    proc = subprocess.run([sys.executable, "-m", "harness.report", str(runs), "--out", str(tmp_path / "results")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "results" / "results.md").read_text()
    # Best val loss 3.0 and 2.0, final 3.5 and 2.0: the two completed runs only.
    assert "| Adam | 5 | 2.5000 ± 0.7071 | 2.7500 ± 1.0607 | 1 | completed 2, diverged 1, interrupted 1, no summary 1 |" \
        in table, table
    assert "| CD | 2 | – | – | – | diverged 1, damaged records 1 |" in table, table
    assert "cd/seed2/metrics.jsonl: line 1 is not a JSON record" in proc.stderr
    assert "completed runs only" in table
