"""harness.token_bins piece by piece: the legacy reader, the folder checks, the source check and
the batches' offsets (milliseconds each; no training, no prepare step)."""
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.errors import UsageError
from harness.token_bins import TokenBins, TokenData, expect_paper_data, read_legacy_meta

HINT = "python -m x.prepare"
LEGACY = TokenData(prepare=HINT, meta="meta.json", legacy_meta="meta.pkl", legacy_provenance="prepare.json",
                   paper={"source": "shakespeare", "vocab_size": 65})


def bins_folder(folder, meta=None, n_train=40, n_val=20):
    folder.mkdir(parents=True, exist_ok=True)
    np.arange(n_train, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(100, 100 + n_val, dtype=np.uint16).tofile(folder / "val.bin")
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


# --------------------------------------------------------------------------- read_legacy_meta

def test_read_legacy_meta_builds_plain_values_of_every_protocol(tmp_path):
    meta = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "pair": (1, 2.5), "flags": [True, False],
            "seen": {"a"}, "frozen": frozenset({"b"})}
    # protocols 0 to 2 name a set's class __builtin__.set (Python 2's), 3 builtins.set, 4 and 5 none
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta, protocol=protocol))
        assert read_legacy_meta(tmp_path / "meta.pkl", HINT) == meta, protocol


def test_read_legacy_meta_refuses_anything_else_in_one_line(tmp_path):
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"vocab_size": 3, "path": Path("/x")}))
    with pytest.raises(UsageError) as err:
        read_legacy_meta(str(path), HINT)  # a str path, as a caller may give
    name = type(Path("/x")).__name__  # PosixPath
    assert str(err.value) == (f"{path} holds objects a meta.pkl never holds (pathlib.{name}): refused to read it "
                              f"(nothing in it was run); prepare the folder again with `{HINT} --force`")
    # torn: damaged, not refused for what it holds (the unpickler says "pickle data was truncated")
    path.write_bytes(pickle.dumps({"vocab_size": 3})[:-3])
    with pytest.raises(UsageError) as err:
        read_legacy_meta(path, HINT)
    assert str(err.value) == f"{path} cannot be read (UnpicklingError); prepare the folder again with `{HINT} --force`"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(UsageError, match=r"cannot be read \(\w+\); prepare the folder again with `python -m x\.prepare --force`$"):
        read_legacy_meta(path, HINT)
    for value in ([1, 2], {"vocab_size": "65"}, {"itos": {}}):
        path.write_bytes(pickle.dumps(value))
        with pytest.raises(UsageError) as err:
            read_legacy_meta(path, HINT)
        assert str(err.value) == (f"{path} is not a vocabulary ({{'vocab_size': int, ...}}); prepare the folder "
                                  f"again with `{HINT} --force`")


# --------------------------------------------------------------------------- TokenBins: the folder

def test_a_folder_is_refused_naming_what_is_missing_and_the_command(tmp_path):
    for gone in ("train.bin", "val.bin", "meta.json"):
        folder = bins_folder(tmp_path / gone, meta={"vocab_size": 5})
        (folder / gone).unlink()
        with pytest.raises(UsageError) as err:
            TokenBins(folder, LEGACY)
        assert str(err.value) == f"dataset {folder} is unfinished (no {gone}); run `{HINT}`"
    with pytest.raises(UsageError) as err:
        TokenBins(tmp_path / "none", LEGACY)
    assert str(err.value) == f"dataset {tmp_path / 'none'} is not prepared; run `{HINT}`"
    folder = bins_folder(tmp_path / "dirs", meta=None)
    (folder / "meta.json").mkdir()  # not a file
    with pytest.raises(UsageError, match=r"unfinished \(no meta\.json\)"):
        TokenBins(folder, LEGACY)


def test_unreadable_metadata_is_refused_in_one_line(tmp_path):
    folder = bins_folder(tmp_path / "d")
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(UsageError) as err:
        TokenBins(folder, LEGACY)
    assert str(err.value) == (f"{folder / 'meta.json'} is not JSON (JSONDecodeError); prepare the folder again "
                              f"with `{HINT} --force`")
    (folder / "meta.json").write_bytes(b'{"a": "\xff"}')  # not UTF-8
    with pytest.raises(UsageError, match=r"is not JSON \(UnicodeDecodeError\)"):
        TokenBins(folder, LEGACY)
    (folder / "meta.json").write_text("[65]")
    with pytest.raises(UsageError) as err:
        TokenBins(folder, LEGACY)
    assert str(err.value) == f"{folder / 'meta.json'} is not a JSON object; prepare the folder again with `{HINT} --force`"


def test_the_json_metadata_wins_over_a_legacy_file_beside_it(tmp_path):
    folder = bins_folder(tmp_path / "d", meta={"vocab_size": 7, "itos": list("abcdefg"), "source": "new"})
    (folder / "meta.pkl").write_bytes(b"garbage: never read")
    (folder / "prepare.json").write_text(json.dumps({"source": "old"}))
    bins = TokenBins(folder, LEGACY)
    assert bins.meta == {"vocab_size": 7, "itos": list("abcdefg"), "source": "new"} and bins.vocab_size == 7
    assert bins.data is LEGACY and bins.data_dir == folder


def test_a_legacy_folder_takes_its_source_from_the_provenance_file_when_it_can(tmp_path):
    folder = bins_folder(tmp_path / "d")
    vocab = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}}
    (folder / "meta.pkl").write_bytes(pickle.dumps(vocab))
    assert TokenBins(folder, LEGACY).meta == vocab  # no provenance file
    for provenance, meta in (
            ({"source": "shakespeare", "plays": 2}, {**vocab, "source": "shakespeare"}),  # only the source is taken
            ({"plays": 2}, vocab), (["source"], vocab), ("source", vocab)):
        (folder / "prepare.json").write_text(json.dumps(provenance))
        assert TokenBins(str(folder), LEGACY).meta == meta, provenance
    (folder / "prepare.json").write_text("{torn")
    assert TokenBins(folder, LEGACY).meta == vocab
    (folder / "prepare.json").write_bytes(b'{"source": "\xff"}')  # not UTF-8: an OSError's sibling, ValueError
    assert TokenBins(folder, LEGACY).meta == vocab
    (folder / "prepare.json").unlink()
    (folder / "prepare.json").mkdir()  # not a file: not read
    assert TokenBins(folder, LEGACY).meta == vocab
    # no provenance file named: the recorded source is not looked for
    (folder / "prepare.json").rmdir()
    (folder / "prepare.json").write_text(json.dumps({"source": "shakespeare"}))
    assert TokenBins(folder, TokenData(prepare=HINT, meta="meta.json", legacy_meta="meta.pkl")).meta == vocab
    # a bad legacy file is refused through read_legacy_meta, naming the prepare command
    (folder / "meta.pkl").write_bytes(pickle.dumps([1]))
    with pytest.raises(UsageError, match=r"meta\.pkl is not a vocabulary .*`python -m x\.prepare --force`$"):
        TokenBins(folder, LEGACY)


def test_vocab_size_is_the_character_vocabularys_as_an_int(tmp_path):
    assert TokenBins(bins_folder(tmp_path / "a", meta={"vocab_size": "65", "itos": []}), LEGACY).vocab_size == 65
    assert TokenBins(bins_folder(tmp_path / "b", meta={"vocab_size": 50257}), LEGACY).vocab_size is None


# --------------------------------------------------------------------------- check_source

def test_check_source_names_every_difference_and_the_override(tmp_path, capsys):
    folder = bins_folder(tmp_path / "d", meta={"vocab_size": 70, "source": "packaged", "itos": []})
    bins = TokenBins(folder, LEGACY)
    expected = {"source": "shakespeare", "vocab_size": 65, "plays": 38}  # plays: not recorded, not compared
    message = (f"{folder} holds data prepared with source 'packaged', not 'shakespeare', vocab_size 70, not 65 "
               f"(the paper's); prepare the paper's data with `{HINT}`")
    with pytest.raises(UsageError) as err:
        bins.check_source(expected, strict=True, override="--set data.check_source=false")
    assert str(err.value) == f"{message}, or pass --set data.check_source=false to train on it anyway"
    assert capsys.readouterr().err == ""
    bins.check_source(expected, strict=False, override="--set data.check_source=false")
    assert capsys.readouterr().err == f"warning: {message}\n"
    bins.check_source({"source": "packaged", "vocab_size": 70}, strict=True, override="x")  # the same: silent
    assert capsys.readouterr().err == ""


def test_check_source_takes_a_folder_without_a_source_on_its_vocabulary(tmp_path, capsys):
    folder = bins_folder(tmp_path / "d", meta={"vocab_size": 65, "itos": []})
    bins = TokenBins(folder, LEGACY)
    bins.check_source({"source": "shakespeare", "vocab_size": 65}, strict=True, override="x")
    assert capsys.readouterr().err == (f"note: {folder} does not record its source (prepared by an earlier version); "
                                       f"taking it as 'shakespeare', its vocabulary matches\n")
    bins.check_source({"vocab_size": 65}, strict=True, override="x")  # no source expected: no note
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match=r"vocab_size 65, not 64 \(the paper's\)"):  # a differing vocabulary: no note
        bins.check_source({"source": "shakespeare", "vocab_size": 64}, strict=True, override="x")
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- batches

def test_an_unknown_split_is_a_one_line_error(tmp_path):
    bins = TokenBins(bins_folder(tmp_path / "d", meta={}), LEGACY)
    with pytest.raises(ValueError) as err:
        bins.num_tokens("test")
    assert str(err.value) == "unknown split 'test'; valid: train, val"
    assert (bins.num_tokens("train"), bins.num_tokens("val")) == (40, 20)


def test_offsets_cover_exactly_zero_to_n_minus_block_size(tmp_path):
    # train.bin holds 0..39: a window of block_size + 1 = 9 tokens starts at 0..31, each as likely
    bins = TokenBins(bins_folder(tmp_path / "d", meta={}), LEGACY)
    x, y = bins.get_batch("train", 4000, 8, torch.Generator().manual_seed(0))
    assert sorted(set(x[:, 0].tolist())) == list(range(32))
    assert torch.equal(y, x + 1) and torch.equal(x - x[:, :1], torch.arange(8).expand(4000, 8))
    # exactly block_size + 1 tokens: the one window; block_size tokens: too few
    x, y = bins.get_batch("val", 3, 19, torch.Generator().manual_seed(0))
    assert x.tolist() == [list(range(100, 119))] * 3 and y.tolist() == [list(range(101, 120))] * 3
    with pytest.raises(UsageError) as err:
        bins.get_batch("val", 3, 20, torch.Generator())
    assert str(err.value) == (f"{tmp_path / 'd' / 'val.bin'} has 20 tokens, fewer than block_size + 1 = 21; "
                              f"lower block_size or prepare more data (`{HINT}`)")


def test_the_bins_are_mapped_read_only(tmp_path):
    # nothing the harness does may change a data folder (np.memmap's default mode, r+, would let it)
    folder = bins_folder(tmp_path / "d", meta={})
    for split in ("train", "val"):
        mapped = TokenBins(folder, LEGACY)._memmap(split)
        with pytest.raises(ValueError, match="read-only"):
            mapped[0] = 7
    assert np.fromfile(folder / "train.bin", dtype=np.uint16)[0] == 0


def test_batches_read_the_bins_as_uint16(tmp_path):
    folder = bins_folder(tmp_path / "d", meta={})
    np.array([65535, 1, 256, 40000], dtype=np.uint16).tofile(folder / "train.bin")
    x, y = TokenBins(folder, LEGACY).get_batch("train", 1, 3, torch.Generator())
    assert x.tolist() == [[65535, 1, 256]] and y.tolist() == [[1, 256, 40000]] and x.dtype == torch.int64


# --------------------------------------------------------------------------- expect_paper_data

def paper_run(tmp_path, data_dir, check_source=None):
    configs = tmp_path / "configs"
    configs.mkdir(exist_ok=True)
    (configs / "paper.yaml").write_text(f"data:\n  dir: {data_dir}\n" if data_dir else "train: {}\n")
    data = {} if check_source is None else {"check_source": check_source}
    return SimpleNamespace(experiment=SimpleNamespace(configs=configs), cfg={"data": data})


def test_expect_paper_data_checks_only_the_papers_folder(tmp_path, monkeypatch, capsys):
    folder = bins_folder(tmp_path / "data" / "paper", meta={"vocab_size": 70, "source": "packaged", "itos": []})
    bins = TokenBins(folder, LEGACY)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as err:  # a relative data.dir is the same folder
        expect_paper_data(bins, paper_run(tmp_path, "data/paper"))
    assert str(err.value).endswith("or pass --set data.check_source=false to train on it anyway")
    with pytest.raises(UsageError):
        expect_paper_data(TokenBins("data/./paper", LEGACY), paper_run(tmp_path, str(folder), check_source=True))
    expect_paper_data(bins, paper_run(tmp_path, "data/paper", check_source=False))
    assert capsys.readouterr().err.startswith(f"warning: {folder} holds data prepared with source 'packaged'")
    # another folder, or a paper config without a data folder: the user's choice, not checked
    expect_paper_data(bins, paper_run(tmp_path, "data/other"))
    expect_paper_data(bins, paper_run(tmp_path, None))
    assert capsys.readouterr().err == ""
    # an experiment that states nothing about its paper data reads no config at all
    plain = TokenBins(folder, TokenData(prepare=HINT, meta="meta.json"))
    expect_paper_data(plain, SimpleNamespace(experiment=SimpleNamespace(configs=tmp_path / "missing"), cfg={}))
    (tmp_path / "configs" / "paper.yaml").write_text("data:\n")  # data: null
    expect_paper_data(bins, SimpleNamespace(experiment=SimpleNamespace(configs=tmp_path / "configs"), cfg={"data": {}}))
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- prepare hints per folder
def test_a_missing_folder_names_the_command_that_prepares_that_folder(tmp_path, monkeypatch):
    """A new user's first smoke run: data/nano-smoke is missing, and the error names the command
    that makes it (the packaged plays), not the paper folder's download."""
    import nano

    monkeypatch.chdir(tmp_path)
    cmd = "python -m nano.prepare --source packaged --plays 2 --out data/nano-smoke"
    with pytest.raises(UsageError) as err:
        TokenBins("data/nano-smoke", nano.DATA)
    assert str(err.value) == f"dataset data/nano-smoke is not prepared; run `{cmd}`"
    with pytest.raises(UsageError) as err:  # the same folder named by its absolute path
        TokenBins(tmp_path / "data/nano-smoke", nano.DATA)
    assert str(err.value).endswith(f"run `{cmd}`")
    with pytest.raises(UsageError) as err:  # a folder no config names: the paper's command
        TokenBins("data/mine", nano.DATA)
    assert str(err.value) == "dataset data/mine is not prepared; run `python -m nano.prepare --source tinyshakespeare`"


@pytest.mark.parametrize("exp", ["nano", "owt"])
def test_every_configs_data_folder_has_the_command_its_comment_names(exp):
    """Each config's data folder is prepared by the command the config's own comment gives."""
    import importlib

    import yaml

    data = importlib.import_module(exp).DATA
    root = Path(__file__).resolve().parents[1] / exp / "configs"
    named = 0
    for path in sorted(root.glob("*.yaml")):
        folder = (yaml.safe_load(path.read_text()) or {}).get("data", {}).get("dir")
        if folder:
            named += 1
            command = data.prepare_for(folder)
            assert command in path.read_text(), (path.name, command)
            assert command == data.prepare or f"--out {folder}" in command
    assert named >= 2
