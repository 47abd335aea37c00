"""harness.rundir's pieces one at a time: temp names, the writer's lock, which folders hold a run,
finding runs, and the record readers' edge cases (no training, no report: milliseconds each, for
the module's mutation run, results/mutation/README.md). Expected values are those the module's
docstrings state; the readers' main cases are in test_rundir.py."""
import fcntl
import json
import os
import socket
from pathlib import Path

import pytest

from harness import rundir
from harness.config import TrainConfig
from harness.errors import UsageError
from harness.rundir import RunDir, best_record, check_folder, finite, finite_values, parse_records, stale_temp


def lines(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# --------------------------------------------------------------------------- names and numbers

def test_stale_temp_is_exactly_a_run_files_temp_name():
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "checkpoint.prev.pt", "train.log",
                 ".lock", "wandb.json", "best_model.pt"):
        assert stale_temp(f".{name}.tmp0") and stale_temp(f".{name}.tmp123456")
    for name in (".notes.txt.tmp1",  # not a run file
                 "checkpoint.pt.tmp1", ".checkpoint.pt.tmp", ".checkpoint.pt.tmpx", ".checkpoint.pt.tmp1x",
                 "x.checkpoint.pt.tmp1", ".checkpoint.pt.tmp1\n", "checkpoint.pt", ".tmp1"):
        assert not stale_temp(name), name


def test_finite():
    assert finite(1) and finite(-2.5) and finite(0.0)
    for value in (True, False, float("nan"), float("inf"), -float("inf"), "1.0", None, [1.0]):
        assert not finite(value), value


def test_finite_values_keeps_the_finite_numbers_of_one_split_as_floats():
    records = [{"split": "val", "loss": 3}, {"split": "train", "loss": 1.0}, {"split": "val", "loss": "nan"},
               {"split": "val", "loss": True}, {"split": "val"}, {"split": "val", "loss": 2.5},
               {"split": "val", "loss": float("inf")}, {"loss": 0.5}]
    values = finite_values(records, "val", "loss")
    assert values == [3.0, 2.5] and all(type(v) is float for v in values)
    assert finite_values(records, "train", "loss") == [1.0] and finite_values(records, "test", "loss") == []


def test_best_record_ties_and_mode():
    rows = [{"split": "val", "acc": 0.5, "n": 0}, {"split": "val", "acc": 0.9, "n": 1},
            {"split": "val", "acc": 0.9, "n": 2}, {"split": "val", "acc": 0.1, "n": 3}, {"split": "train", "acc": 2.0}]
    assert best_record(rows, "val", "acc", "max")["n"] == 1  # the first of equal values
    assert best_record(rows, "val", "acc")["n"] == 3  # min by default
    assert best_record(rows, "test", "acc", "max") is None
    with pytest.raises(ValueError) as e:
        best_record(rows, "val", "acc", "MIN")
    assert str(e.value) == "mode must be min or max, got 'MIN'"


def test_parse_records_rule():
    assert parse_records(b"") == []
    with pytest.raises(UsageError) as e:
        parse_records(b'\n\n{"a": 1}\n[1, 2]\n{"a": 2}\n')  # valid JSON but not an object, on line 4
    assert str(e.value) == "metrics.jsonl: line 4 is not a JSON record (only an unfinished last line may be)"
    with pytest.raises(UsageError) as e:
        parse_records(b"x\n", "runs/a/metrics.jsonl")
    assert str(e.value).startswith("runs/a/metrics.jsonl: line 1 is not")
    assert parse_records(b'{"a": 1}\n[1, 2]') == [{"a": 1}]  # an unfinished last line that is no record: skipped
    assert parse_records(b'{"a": 1}\n  \n{"b": 2}') == [{"a": 1}, {"b": 2}]
    assert parse_records(b'{"s": "\xff"}\n') == [{"s": "\ufffd"}]  # bytes that are not UTF-8 are replaced


# --------------------------------------------------------------------------- one run directory's files

def test_file_names(tmp_path):
    run = RunDir(str(tmp_path / "r"))
    assert run.path == tmp_path / "r" and isinstance(run.path, Path)
    assert (run.config_file, run.metrics_file, run.summary_file, run.checkpoint_file, run.log_file, run.lock_file) == \
        tuple(tmp_path / "r" / n for n in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt",
                                           "train.log", ".lock"))
    assert RunDir(tmp_path / "r") == run and hash(RunDir(tmp_path / "r")) == hash(run)


def test_summary_status_and_finished(tmp_path):
    run = RunDir(tmp_path)
    for text, summary in (("{", None), ("[1]", None), ('{"x": 1}', {"x": 1}), ('{"status": "diverged"}', {"status": "diverged"})):
        run.summary_file.write_text(text)
        assert run.summary() == summary
    assert run.status() == "diverged" and run.finished()
    for status, finished in (("completed", True), ("interrupted", False), ("running", False)):
        run.summary_file.write_text(json.dumps({"status": status}))
        assert (run.status(), run.finished()) == (status, finished)
    run.summary_file.write_text('{"x": 1}')
    assert run.status() is None and not run.finished()


def test_config_reads_the_yaml_or_none(tmp_path):
    run = RunDir(tmp_path)
    assert run.config() is None
    run.config_file.write_text("experiment: nano\noptimizer: {name: cd}\n")
    assert run.config() == {"experiment": "nano", "optimizer": {"name": "cd"}}
    run.config_file.unlink()
    run.config_file.mkdir()  # a folder of that name is no config
    assert run.config() is None


def test_last_record_edges(tmp_path):
    run = RunDir(tmp_path)
    assert run.last_record() is None  # no file
    run.metrics_file.write_text(lines({"step": 1}))  # one record, shorter than the tail
    assert run.last_record() == {"step": 1}
    run.metrics_file.write_text(lines({"step": 1}) + "not json\n" + lines({"step": 2})[:-1])
    assert run.last_record() is None  # a corrupt tail reads as no record, not an error
    # A tail that starts exactly at a line: the piece before the first newline inside it is dropped.
    head = lines({"step": 0, "pad": "x" * 5000})
    run.metrics_file.write_text(head + lines({"step": 1}) + lines({"step": 2}))
    assert run.last_record() == {"step": 2}
    run.metrics_file.write_text(lines({"step": 0}) + '{"pad": "' + "y" * 5000)  # a tail with no newline at all
    assert run.last_record() is None


def test_last_record_reads_exactly_the_last_tail_bytes(tmp_path):
    run = RunDir(tmp_path)

    def line_of(size):  # one record line of exactly ``size`` bytes, newline included
        text = lines({"step": 1, "pad": ""})
        return lines({"step": 1, "pad": "x" * (size - len(text))})

    assert len(line_of(rundir.TAIL_BYTES)) == 4096  # the docstring's "a few records"
    # A last line one byte shorter than the tail: the newline before it is inside the tail, the line is whole.
    run.metrics_file.write_text(lines({"step": 0}) + line_of(4095))
    assert run.last_record()["step"] == 1
    # Exactly as long as the tail: the tail starts inside the file, so its first piece (here the whole
    # line, which the reader cannot tell from a piece) is dropped: no record.
    run.metrics_file.write_text(lines({"step": 0}) + line_of(4096))
    assert run.last_record() is None
    # One byte longer than the tail: the tail starts at the file's second byte, inside the first line.
    first = lines({"step": 0})
    run.metrics_file.write_text(first + line_of(4097 - len(first)))
    assert run.last_record()["step"] == 1


def test_records_after_at_the_end_and_beyond(tmp_path):
    run = RunDir(tmp_path)
    text = lines({"a": 1}, {"a": 2})
    run.metrics_file.write_text(text)
    assert run.records_after(len(text)) == ([], len(text))
    assert run.records_after(len(lines({"a": 1}))) == ([{"a": 2}], len(text))
    run.metrics_file.write_text(text + '{"a": 3')  # an unfinished line only: nothing new, the offset stays
    assert run.records_after(len(text)) == ([], len(text))
    assert run.records_after(len(text) + 7) == ([], len(text) + 7)  # as long as the file: not truncated
    assert run.records_after(len(text) + 8) == ([{"a": 1}, {"a": 2}], len(text))  # longer: read from the start


def test_the_readers_name_the_file_of_a_corrupt_line(tmp_path):
    run = RunDir(tmp_path)
    run.metrics_file.write_text("not json\n" + lines({"a": 1}))
    for read in (run.records, lambda: run.records_after(0)):
        with pytest.raises(UsageError) as e:
            read()
        assert str(e.value) == f"{run.metrics_file}: line 1 is not a JSON record (only an unfinished last line may be)"


def test_progress_edges(tmp_path):
    def train(**keys):  # the schema the runs' configs are read into (train.epochs >= 1 when set)
        return TrainConfig(batch_size=1, **keys)

    run = RunDir(tmp_path)
    run.metrics_file.write_text(lines({"step": 30, "epoch": 1}))
    assert run.progress(train(max_iters=120)) == 0.25  # an epoch but no train.epochs: by steps
    assert run.progress(train(epochs=4, max_iters=60)) == 0.25
    assert run.progress(train()) == 1.0  # max_iters missing: 1
    assert run.progress(train(max_iters=0)) == 1.0  # never a division by 0
    run.metrics_file.write_text(lines({"step": 90, "epoch": 3}))
    assert run.progress(train(epochs=2)) == 1.0  # at most 1
    run.metrics_file.write_text(lines({"step": 1}))
    assert run.progress(train()) == 1.0 and run.progress(train(max_iters=0)) == 1.0
    assert run.progress(train(max_iters=1)) == 1.0
    run.metrics_file.write_text(lines({"epoch": 0}))
    assert run.progress(train(max_iters=10)) == 0.0  # no step: 0
    run.metrics_file.write_text(lines({"step": 3}))
    assert run.progress(train(max_iters=4, epochs=2)) == 0.75  # no epoch in the record: by steps


def test_find_runs_and_unfinished_runs(tmp_path):
    for folder, name in (("b", "summary.json"), ("a/seed1", "summary.json"), ("c", "config.yaml"), ("d", "metrics.jsonl"),
                         ("a/seed2", "config.yaml")):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_text("{}")
    (tmp_path / "b" / "config.yaml").write_text("{}")  # found once
    assert RunDir.find(tmp_path) == [RunDir(tmp_path / "a" / "seed1"), RunDir(tmp_path / "b")]
    assert RunDir.find(str(tmp_path), unfinished=True) == [RunDir(tmp_path / p) for p in ("a/seed1", "a/seed2", "b", "c")]
    assert RunDir.find(tmp_path / "none") == []


# --------------------------------------------------------------------------- which folders hold a run

def folder_with(tmp_path, files: dict) -> RunDir:
    path = tmp_path / "out"
    path.mkdir()
    for name, text in files.items():
        if text is None:
            (path / name).mkdir()
        else:
            (path / name).write_text(text)
    return RunDir(path)


@pytest.mark.parametrize("files,own", [
    ({}, True),
    ({".lock": ""}, True), ({"checkpoint.pt": ""}, True), ({"checkpoint.prev.pt": ""}, True), ({"train.log": ""}, True),
    ({".summary.json.tmp77": ""}, True),
    ({"summary.json": '{"status": "interrupted"}'}, True),
    ({"config.yaml": "experiment: nano\noptimizer: {name: cd}\n"}, True),
    ({"notes.txt": ""}, False), ({".notes.txt.tmp1": ""}, False), ({"metrics.jsonl": ""}, False),
    ({".lock": None}, False), ({"checkpoint.pt": None, "train.log": None}, False),  # folders with those names
    ({"summary.json": '{"x": 1}'}, False), ({"summary.json": "[1]"}, False),
    ({"config.yaml": "experiment: nano\n"}, False),
    ({"config.yaml": "optimizer: {name: cd}\n"}, False),
    ({"config.yaml": "experiment: nano\noptimizer: {lr: 1}\n"}, False),
    ({"config.yaml": "experiment: nano\noptimizer: null\n"}, False),
    ({"config.yaml": "- 1\n"}, False),  # not a mapping: read_yaml's error
    ({"config.yaml": "a: [\n"}, False),  # not YAML
])
def test_is_own(tmp_path, files, own):
    assert folder_with(tmp_path, files).is_own() is own


def test_a_missing_folder_or_a_file_is_own(tmp_path):
    assert RunDir(tmp_path / "none").is_own()
    (tmp_path / "f").write_text("x")
    assert RunDir(tmp_path / "f").is_own()  # not a folder: nothing of it would be listed or replaced here


def test_check_own_names_a_few_entries(tmp_path):
    run = folder_with(tmp_path, {"e": "", "d": "", "c": None, "b": "", "a": ""})
    with pytest.raises(UsageError) as e:
        run.check_own("--runs-dir")
    assert str(e.value) == (f"--runs-dir {run.path} is not empty and holds no run (a, b, c/, d, ... (5 entries)): the "
                            "run would write over its files; choose an empty or new folder")
    (run.path / "e").unlink()
    with pytest.raises(UsageError) as e:
        run.check_own()
    assert str(e.value).startswith(f"--out {run.path} is not empty and holds no run (a, b, c/, d): the run")
    (run.path / "train.log").write_text("")
    run.check_own()  # a run of the kit: no error


# --------------------------------------------------------------------------- the writer's lock

@pytest.fixture
def held(monkeypatch):
    """The process's held locks, emptied for the test and their files closed after it."""
    table = {}
    monkeypatch.setattr(rundir, "_HELD", table)
    yield table
    for fd in table.values():
        os.close(fd)


def other_holder(path: Path, text: bytes) -> int:
    """Hold ``path/.lock`` through a second open file, as another process would."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, text)
    return fd


def test_lock_creates_the_folder_and_writes_host_and_pid(tmp_path, held):
    run = RunDir(tmp_path / "a" / "b")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").mkdir()
    (run.lock_file).write_text("a-much-longer-hostname-of-a-dead-run 4194304\n")  # a stale lock: taken over
    run.lock()
    assert run.lock_file.read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    assert list(held) == [str(run.path.resolve())]
    fd = os.open(run.lock_file, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # held: exclusively
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    run.lock_file.write_text("kept\n")
    RunDir(tmp_path / "a" / "x" / ".." / "b").lock()  # held already by this process: nothing happens
    assert run.lock_file.read_text() == "kept\n" and len(held) == 1
    new = RunDir(tmp_path / "new" / "deep")
    new.lock()
    assert new.path.is_dir() and (new.lock_file.stat().st_mode & 0o777) == 0o644 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_lock_held_by_another_is_one_line_naming_it(tmp_path, held):
    run = RunDir(tmp_path / "run")
    fd = other_holder(run.path, b"node7 4242\n")
    try:
        with pytest.raises(UsageError) as e:
            run.lock()
        assert str(e.value) == (f"{run.path} is in use by another run (host node7, pid 4242); wait for it to finish "
                                "or stop it, or choose another --out")
        assert held == {} and run.lock_file.read_text() == "node7 4242\n"  # nothing of it changed
        os.ftruncate(fd, 0)  # a holder that has not written its name yet
        with pytest.raises(UsageError, match=r"\(host \?, pid \?\)"):
            run.lock()
        os.pwrite(fd, b"node7", 0)  # ... or only part of it
        with pytest.raises(UsageError, match=r"\(host node7, pid node7\)"):
            run.lock()
        os.pwrite(fd, b"\xffnode 42\n", 0)  # bytes that are not UTF-8: replaced, still one line
        with pytest.raises(UsageError, match="\\(host \ufffdnode, pid 42\\)"):
            run.lock()
    finally:
        os.close(fd)
    run.lock()  # released: taken
    assert held.keys() == {str(run.path.resolve())}


def test_lock_refuses_a_folder_with_no_run(tmp_path, held):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(UsageError, match="is not empty and holds no run"):
        RunDir(tmp_path).lock()
    assert not (tmp_path / ".lock").exists() and held == {}


# --------------------------------------------------------------------------- check_folder

def test_check_folder(tmp_path):
    check_folder(tmp_path / "new" / "deeper", "--out")  # nothing there yet: fine
    check_folder(tmp_path, "--out")
    (tmp_path / "f").write_text("")
    for path in (tmp_path / "f", tmp_path / "f" / "sub" / "x"):
        with pytest.raises(UsageError) as e:
            check_folder(path, "--runs-dir")
        assert str(e.value) == f"--runs-dir {path}: {tmp_path / 'f'} is a file, not a folder; choose another --runs-dir"


def test_check_folder_of_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError) as e:
        check_folder(Path("f") / "x", "--out")
    assert str(e.value) == f"--out f/x: {tmp_path / 'f'} is a file, not a folder; choose another --out"
    check_folder(Path("g") / "x", "--out")
