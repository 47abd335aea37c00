"""harness.checkpoint on its own: the atomic writer, the weights-only reader, the fallback to the
previous checkpoint, stale temp files and the random-number-generator states (no training run: each
test takes milliseconds, so that the module's mutation run, results/mutation/README.md, is quick).
The expected names, messages and orders are those the module's docstrings promise."""
import errno
import io
import os
import random
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import checkpoint as ckpt
from harness.errors import DISK_FULL, UsageError

ROOT = Path(__file__).resolve().parents[1]
OLD_CHECKPOINT = ROOT / "tests" / "fixtures" / "old_nano" / "run" / "checkpoint.pt"  # numpy RNG state inside


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- names

def test_previous_and_temp_names():
    assert ckpt.previous(Path("run/checkpoint.pt")) == Path("run/checkpoint.prev.pt")
    assert ckpt.previous("best_model.pt") == Path("best_model.prev.pt")
    assert ckpt.temp_name(Path("run/checkpoint.pt")) == Path(f"run/.checkpoint.pt.tmp{os.getpid()}")
    assert ckpt.temp_name("summary.json") == Path(f".summary.json.tmp{os.getpid()}")


# --------------------------------------------------------------------------- the atomic writer

def test_write_atomic_takes_bytes_a_bytearray_a_writer_or_text(tmp_path):
    path = tmp_path / "f.bin"
    ckpt.write_atomic(path, b"abc")
    assert path.read_bytes() == b"abc"
    ckpt.write_atomic(path, bytearray(b"xyz"))
    assert path.read_bytes() == b"xyz"
    ckpt.write_atomic(path, lambda f: f.write(b"123"))
    assert path.read_bytes() == b"123"
    ckpt.write_text_atomic(path, "naïve ✓\n")
    assert path.read_bytes() == "naïve ✓\n".encode("utf-8")
    assert files(tmp_path) == ["f.bin"]  # no temp file left, no previous copy unless asked for


def test_write_atomic_fsyncs_the_file_then_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append(("folder" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "f.bin"
    ckpt.write_atomic(path, b"data")
    # The renamed temp file is the file (same inode); the folder's fsync makes the new name durable.
    assert synced == [("file", path.stat().st_ino), ("folder", tmp_path.stat().st_ino)]


def test_fsync_folder_takes_only_a_folder(tmp_path):
    ckpt.fsync_folder(tmp_path)
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        ckpt.fsync_folder(tmp_path / "f")


def test_keep_previous_keeps_exactly_the_replaced_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    prev = tmp_path / "checkpoint.prev.pt"
    ckpt.write_atomic(path, b"one", keep_previous=True)  # nothing to keep yet
    assert files(tmp_path) == ["checkpoint.pt"]
    ckpt.write_atomic(path, b"two", keep_previous=True)
    assert (path.read_bytes(), prev.read_bytes()) == (b"two", b"one")
    # A link temp left by a writer killed mid-way does not stop the next one.
    ckpt.temp_name(prev).write_bytes(b"torn")
    ckpt.write_atomic(path, b"three", keep_previous=True)
    assert (path.read_bytes(), prev.read_bytes()) == (b"three", b"two")
    ckpt.write_atomic(path, b"four")  # without keep_previous the previous copy is left alone
    assert (path.read_bytes(), prev.read_bytes()) == (b"four", b"two")
    assert files(tmp_path) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def failing(error):
        def write(f):
            f.write(b"half")
            raise error
        return write

    with pytest.raises(ValueError, match="boom"):
        ckpt.write_atomic(path, failing(ValueError("boom")))
    with pytest.raises(OSError) as e:  # any other OSError is passed on as it is
        ckpt.write_atomic(path, failing(OSError(errno.EIO, "I/O error")))
    assert e.type is OSError and e.value.errno == errno.EIO
    with pytest.raises(UsageError) as e:  # a full disk: one line naming the file
        ckpt.write_atomic(path, failing(OSError(errno.ENOSPC, "No space left on device")))
    assert str(e.value) == f"{path}: {DISK_FULL}"
    assert path.read_bytes() == b"old" and files(tmp_path) == ["f.bin"]


def test_a_full_disk_before_the_temp_file_exists_is_the_same_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "open", full, raising=False)  # the writer's open(), before any byte
    path = tmp_path / "f.bin"
    with pytest.raises(UsageError) as e:
        ckpt.write_atomic(path, b"data")
    assert str(e.value) == f"{path}: {DISK_FULL}"
    assert files(tmp_path) == []


# --------------------------------------------------------------------------- torch files, weights-only

def test_save_atomic_round_trips_tensors_and_plain_containers(tmp_path):
    path = tmp_path / "checkpoint.pt"
    obj = {"step": 3, "w": torch.arange(4.0), "plain": [1, "a", None, (2.5, True)], "rng": torch.ones(2, dtype=torch.uint8)}
    ckpt.save_atomic(obj, path)
    loaded = ckpt.load(path)
    assert loaded.keys() == obj.keys() and loaded["plain"] == [1, "a", None, (2.5, True)] and loaded["step"] == 3
    assert torch.equal(loaded["w"], obj["w"]) and loaded["w"].device.type == "cpu"
    assert torch.equal(loaded["rng"], obj["rng"])
    assert files(tmp_path) == ["checkpoint.pt"]
    ckpt.save_atomic({"step": 4}, path, keep_previous=True)
    assert ckpt.load(ckpt.previous(path))["step"] == 3
    ckpt.save_atomic({"step": 5}, path)  # default: the previous copy is not replaced
    assert (ckpt.load(path)["step"], ckpt.load(ckpt.previous(path))["step"]) == (5, 3)


def test_load_with_mmap_leaves_the_tensors_in_the_file(tmp_path, monkeypatch):
    import torch.serialization

    path = tmp_path / "checkpoint.pt"
    ckpt.save_atomic({"w": torch.arange(6.0)}, path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):  # torch's mmap leaves no trace on the tensor it gives: watch the call
        calls.append((kwargs.get("map_location"), kwargs.get("weights_only"), kwargs.get("mmap")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    mapped, read = ckpt.load(path, mmap=True)["w"], ckpt.load(path)["w"]
    assert torch.equal(mapped, read) and torch.equal(read, torch.arange(6.0))
    ckpt.load_latest(path, mmap=True)
    ckpt.load_latest(path)  # read into memory unless asked
    assert calls == [("cpu", True, True), ("cpu", True, False), ("cpu", True, True), ("cpu", True, False)]


def _rewrite_pickle(src: Path, dst: Path, old: bytes, new: bytes) -> None:
    """``src`` with ``old`` replaced by ``new`` in its pickle (as an earlier numpy would have named it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(info, data)


def test_checkpoints_of_earlier_versions_load_with_their_numpy_state(tmp_path):
    saved = ckpt.load(OLD_CHECKPOINT)  # written under numpy 2: numpy._core.multiarray._reconstruct
    key = saved["rng"][0]["numpy"][1]  # one RNG state per rank; numpy's as get_state()'s tuple
    assert isinstance(key, np.ndarray) and key.dtype == np.uint32 and key.shape == (624,)
    # The same file as numpy 1 wrote it: numpy.core.multiarray._reconstruct.
    numpy1 = tmp_path / "numpy1.pt"
    _rewrite_pickle(OLD_CHECKPOINT, numpy1, b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")
    assert np.array_equal(ckpt.load(numpy1)["rng"][0]["numpy"][1], key)
    # numpy >= 1.25 may name the uint32 dtype's class.
    ckpt.save_atomic({"dtype": np.dtypes.UInt32DType}, tmp_path / "dtype.pt")
    assert ckpt.load(tmp_path / "dtype.pt")["dtype"] is np.dtypes.UInt32DType


class Planted:
    """Unpickling it would create ``marker`` (as a planted ``os.system(...)`` would run a command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_with_other_objects_is_refused_in_one_line(tmp_path):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "marker"
    torch.save({"step": 1, "payload": Planted(marker)}, path)
    with pytest.raises(ckpt.UnsafeCheckpoint) as e:
        ckpt.load(path)
    assert str(e.value) == (f"{path} holds objects no checkpoint of this kit holds (io.open): refused to load it, "  # open pickles as io.open
                            "nothing in it was run; it was written by something else: delete it (and the run, if you "
                            "did not put it there)")
    assert not marker.exists()


def with_pickle(path: Path, pickle_bytes: bytes) -> Path:
    """A torch file at ``path`` whose pickle is ``pickle_bytes``."""
    torch.save({"step": 1}, path)
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                data = pickle_bytes
            zout.writestr(info, data)
    path.write_bytes(buf.getvalue())
    return path


def test_a_pickle_opcode_the_reader_does_not_know_is_refused_by_name(tmp_path):
    # A pickle of another protocol's opcode (here BINPERSID's cousin: PERSID, b"P") the weights-only reader lacks.
    path = with_pickle(tmp_path / "checkpoint.pt", b"\x80\x02Pid\n.")
    with pytest.raises(ckpt.UnsafeCheckpoint, match=r"holds objects no checkpoint of this kit holds \(Unsupported operand \S+\)"):
        ckpt.load(path)


def test_a_pickle_that_names_no_object_is_damaged_not_unsafe(tmp_path):
    import pickle

    path = with_pickle(tmp_path / "checkpoint.pt", b"\x80\x02K\x01K\x02b.")  # BUILD on an int: nonsense, no global
    with pytest.raises(pickle.UnpicklingError) as e:
        ckpt.load(path)
    assert not isinstance(e.value, ckpt.UnsafeCheckpoint)


def test_a_torn_file_is_not_called_unsafe(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_atomic({"w": torch.arange(100.0)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(Exception) as e:
        ckpt.load(path)
    assert not isinstance(e.value, ckpt.UnsafeCheckpoint)


# --------------------------------------------------------------------------- the previous checkpoint as a fallback

def _pair(folder: Path, last=None, prev=None) -> Path:
    path = folder / "checkpoint.pt"
    for where, step in ((path, last), (ckpt.previous(path), prev)):
        if step == "torn":
            where.write_bytes(b"PK\x03\x04 torn")
        elif step is not None:
            ckpt.save_atomic({"step": step}, where)
    return path


def test_load_latest_takes_the_last_checkpoint_silently(tmp_path, capsys):
    path = _pair(tmp_path, 20, 10)
    assert ckpt.load_latest(path)["step"] == 20
    assert ckpt.load_latest(path, usable=lambda saved: None)["step"] == 20
    assert capsys.readouterr().err == ""


def test_load_latest_falls_back_to_the_previous_one_with_a_warning(tmp_path, capsys):
    path = _pair(tmp_path, "torn", 10)
    prev = ckpt.previous(path)
    assert ckpt.load_latest(path)["step"] == 10
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {path} cannot be read (damaged or truncated)",
        f"warning: resuming from the previous checkpoint {prev}"]
    path.unlink()  # a missing last checkpoint is no reason to warn about, the fallback is
    assert ckpt.load_latest(path)["step"] == 10
    assert capsys.readouterr().err.splitlines() == [f"warning: resuming from the previous checkpoint {prev}"]
    path = _pair(tmp_path, 20, None)
    assert ckpt.load_latest(path, usable=lambda saved: None if saved["step"] == 10 else "is of another run")["step"] == 10
    assert capsys.readouterr().err.splitlines() == [f"warning: {path} is of another run",
                                                   f"warning: resuming from the previous checkpoint {prev}"]


def test_load_latest_with_nothing_usable_is_one_error_line(tmp_path, capsys):
    path = _pair(tmp_path, "torn", 10)
    prev = ckpt.previous(path)
    with pytest.raises(UsageError) as e:
        ckpt.load_latest(path, usable=lambda saved: "is of another run")
    assert str(e.value) == (f"{path} cannot be read (damaged or truncated); {prev} is of another run: no checkpoint "
                            "to resume from; delete checkpoint.pt and checkpoint.prev.pt to restart the run from scratch")
    assert capsys.readouterr().err == ""  # no warnings besides the one error
    path.unlink(), prev.unlink()
    with pytest.raises(UsageError) as e:
        ckpt.load_latest(path)
    assert str(e.value) == (f"{path} is missing: no checkpoint to resume from; delete checkpoint.pt and "
                            "checkpoint.prev.pt to restart the run from scratch")


def test_load_latest_never_passes_over_an_unsafe_checkpoint(tmp_path):
    path = _pair(tmp_path, None, 10)
    torch.save({"payload": Planted(tmp_path / "marker")}, path)
    with pytest.raises(ckpt.UnsafeCheckpoint):
        ckpt.load_latest(path)
    assert not (tmp_path / "marker").exists()


# --------------------------------------------------------------------------- stale temp files

def test_remove_stale_temps_removes_only_the_writers_temp_files(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"someone else's")
    run = tmp_path / "run"
    run.mkdir()
    for name in (".checkpoint.pt.tmp123", ".metrics.jsonl.tmp9", "checkpoint.pt", ".notes.txt.tmp1"):
        (run / name).write_bytes(b"x")
    (run / ".config.yaml.tmp5").symlink_to(outside)  # a link named like a temp file: not ours
    (run / ".summary.json.tmp7").mkdir()  # a folder named like one: not ours
    ckpt.remove_stale_temps(run)
    assert files(run) == [".config.yaml.tmp5", ".notes.txt.tmp1", ".summary.json.tmp7", "checkpoint.pt"]
    assert outside.read_bytes() == b"someone else's"


def test_remove_stale_temps_removes_only_the_named_files_temps(tmp_path):
    for name in (".checkpoint.pt.tmp1", ".train.bin.tmp2", ".val.bin.tmp3"):
        (tmp_path / name).write_bytes(b"x")
    ckpt.remove_stale_temps(tmp_path, ("train.bin",))  # a prepare step's data files
    assert files(tmp_path) == [".checkpoint.pt.tmp1", ".val.bin.tmp3"]
    ckpt.remove_stale_temps(tmp_path, ())  # no files named: none of their temps, not the run files'
    assert files(tmp_path) == [".checkpoint.pt.tmp1", ".val.bin.tmp3"]


def test_remove_stale_temps_takes_a_temp_file_gone_meanwhile_in_its_stride(tmp_path, monkeypatch):
    (tmp_path / ".checkpoint.pt.tmp1").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(folder):  # the entries as listed, their files removed before the cleaner gets to them
        entries = list(real_scandir(folder))
        for entry in entries:
            os.unlink(entry.path)
        return iter(entries)

    monkeypatch.setattr(os, "scandir", scandir)
    ckpt.remove_stale_temps(tmp_path)
    assert files(tmp_path) == []


# --------------------------------------------------------------------------- random-number generators

def _draws():
    return random.random(), float(np.random.standard_normal()), float(np.random.rand()), torch.rand(2).tolist()


def _scramble():
    random.seed(99), np.random.seed(99), torch.manual_seed(99)


def test_rng_state_restores_every_generator_also_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves the legacy generator's second gaussian cached (has_gauss)
    state = ckpt.rng_state()
    assert state["numpy"]["has_gauss"] == 1 and state["numpy"]["key"].dtype == torch.int64
    assert "cuda" not in state  # no CUDA here
    expected = _draws()
    _scramble()
    ckpt.set_rng_state(state)
    assert _draws() == expected
    ckpt.save_atomic(state, tmp_path / "rng.pt")
    _scramble()
    ckpt.set_rng_state(ckpt.load(tmp_path / "rng.pt"))
    assert _draws() == expected


def test_set_rng_state_takes_the_states_of_earlier_versions():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()
    version, internal, gauss = random.getstate()
    old = {"python": [version, list(internal), gauss],  # as a list of lists, the tuples of an older reader
           "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = _draws()
    _scramble()
    ckpt.set_rng_state(old)
    assert _draws() == expected


def test_cuda_generators_one_per_process_and_the_old_list_of_every_device(monkeypatch):
    def cuda_state(device):
        return torch.full((4,), device, dtype=torch.uint8)

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", cuda_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.tolist(), device)))
    state = ckpt.rng_state()
    assert torch.equal(state["cuda"], cuda_state(1))  # this process's own device's
    ckpt.set_rng_state(state)
    assert restored == [([1] * 4, 1)]
    restored.clear()
    ckpt.set_rng_state({**state, "cuda": [cuda_state(0), cuda_state(1), cuda_state(2)]})  # earlier: every device's
    assert restored == [([1] * 4, 1)]
    restored.clear()
    ckpt.set_rng_state({**state, "cuda": [cuda_state(0)]})  # saved on fewer devices: nothing for this one
    ckpt.set_rng_state({k: v for k, v in state.items() if k != "cuda"})  # saved without CUDA
    assert restored == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt.set_rng_state(state)  # a CUDA state restored where there is no CUDA: only the CPU's
    assert restored == []
