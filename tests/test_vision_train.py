"""The vit and cifar training scripts end to end on a generated miniature CIFAR-10.

Run contract, exact mid-epoch resume, cifar's test of the best-validation weights, two
ranks under torchrun, one-line errors, and the configs against the paper's protocol.

200 training images (180 train / 20 validation) and 50 test images; the smoke configs'
batch of 32 gives 6 steps per epoch (the last batch holds 20 images), 2 epochs.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

import optimizers
import harness.cifar10
from harness import image_classification
from cifar import train as cifar_train
from cifar.model import resnet18
from harness import checkpoint as ckpt
from harness import config as config_lib
from harness.data import eval_loader
from harness.loop import EXIT_INTERRUPTED, STOP_AFTER_ENV
from harness.run import Run
from tests.cifar_fixture import UncheckedCIFAR10, make_fake_cifar10
from vit import train as vit_train
from vit.model import build_vit
from conftest import records

ROOT = Path(__file__).resolve().parents[1]
MAIN = {"vit": vit_train.main, "cifar": cifar_train.main}
STEPS_PER_EPOCH, EPOCHS = 6, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: a second intra-op thread only adds synchronisation (and, on a busy machine, waiting).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def unchecked_cifar10(monkeypatch):
    # Generated files cannot match torchvision's md5 sums: read them with the unchecked class.
    monkeypatch.setattr(harness.cifar10, "DATASET_CLASS", UncheckedCIFAR10)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return make_fake_cifar10(tmp_path_factory.mktemp("cifar10"), n_train=200, n_test=50, seed=7)


def args(exp, root, out, optimizer, seed=0, *extra):
    return ["--optimizer", optimizer, "--seed", str(seed), "--config", str(ROOT / exp / "configs" / "smoke.yaml"),
            "--set", f"data.root={root}", "--out", str(out), *extra]


def split_of(rows, split):
    return [r for r in rows if r["split"] == split]


def evaluate_on(model, dataset):
    """Mean cross entropy and accuracy of ``model`` over ``dataset`` in one batch, computed here."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        logits = model(images)
    return torch.nn.functional.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).sum().item() / len(labels)


VIT_RUNS = {"adam": ["--set", "model.drop_rate=0"], "ikfad": []}  # ikfad keeps dropout: resume restores its RNG
CIFAR_RUNS = {"adam": [], "cd": []}


def train_all(main, exp, runs, seed, cifar_root, out):
    """One smoke run per optimizer of ``runs`` on the generated CIFAR-10, under ``out``."""
    mp = pytest.MonkeyPatch()
    mp.setattr(harness.cifar10, "DATASET_CLASS", UncheckedCIFAR10)
    try:
        for name, extra in runs.items():
            assert main(args(exp, cifar_root, out / name, name, seed, *extra)) == 0
    finally:
        mp.undo()
    return out


@pytest.fixture(scope="module")
def vit_runs(cifar_root, tmp_path_factory):
    return train_all(vit_train.main, "vit", VIT_RUNS, 0, cifar_root, tmp_path_factory.mktemp("vit_runs"))


@pytest.fixture(scope="module")
def cifar_runs(cifar_root, tmp_path_factory):
    return train_all(cifar_train.main, "cifar", CIFAR_RUNS, 1, cifar_root, tmp_path_factory.mktemp("cifar_runs"))


def check_common_contract(run_dir, exp, name, eval_splits):
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["experiment"] == exp and cfg["optimizer"]["name"] == name
    assert cfg["train"]["epochs"] == EPOCHS and cfg["train"]["batch_size"] == 32 and cfg["data"]["subset"] == 512
    rows = records(run_dir)
    assert all(math.isfinite(r["loss"]) and 0 <= r["acc"] <= 1 for r in rows)
    ends = [STEPS_PER_EPOCH * e for e in range(EPOCHS + 1)]
    for split, n_images in eval_splits.items():
        evals = split_of(rows, split)
        assert [r["step"] for r in evals] == ends and [r["epoch"] for r in evals] == [0.0, 1.0, 2.0]
        # accuracy over the whole split: a multiple of 1/(images in the split)
        assert all(abs(r["acc"] * n_images - round(r["acc"] * n_images)) < 1e-9 for r in evals)
    train = split_of(rows, "train")
    assert [r["step"] for r in train] == ends[1:] and [r["epoch"] for r in train] == [1.0, 2.0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == EPOCHS * STEPS_PER_EPOCH
    val = split_of(rows, "val")
    assert summary["best_val_loss"] == min(r["loss"] for r in val)
    assert summary["best_val_acc"] == max(r["acc"] for r in val)
    assert (run_dir / "checkpoint.pt").stat().st_size > 0
    return rows, summary


@pytest.mark.parametrize("name", list(VIT_RUNS))
def test_vit_smoke_writes_the_run_contract(vit_runs, cifar_root, name):
    run_dir = vit_runs / name
    rows, summary = check_common_contract(run_dir, "vit", name, {"val": 20, "test": 50})
    assert [r["split"] for r in rows[:2]] == ["val", "test"]  # step 0: no train record yet
    val = split_of(rows, "val")
    best = min(val, key=lambda r: r["loss"])
    assert summary["best"] == {"split": "val", "key": "loss", "value": best["loss"], "step": best["step"]}
    assert summary["final"]["test"]["acc"] == split_of(rows, "test")[-1]["acc"]
    assert not (run_dir / image_classification.BEST_MODEL).exists()
    # The last test record is the final weights evaluated on the whole test set.
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = build_vit(**cfg["model"])
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    test = harness.cifar10.cifar10_splits(cifar_root, dataset_cls=UncheckedCIFAR10)["test"]
    loss, acc = evaluate_on(model, test)
    assert loss == pytest.approx(split_of(rows, "test")[-1]["loss"], rel=1e-5)
    assert acc == split_of(rows, "test")[-1]["acc"]


def stop_and_resume(exp, argv, stop_after, monkeypatch):
    monkeypatch.setenv(STOP_AFTER_ENV, str(stop_after))
    assert MAIN[exp](argv) == EXIT_INTERRUPTED
    out = Path(argv[argv.index("--out") + 1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == stop_after
    assert max(r["step"] for r in records(out)) < stop_after  # nothing logged past the last evaluation
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert MAIN[exp](argv) == 0


def test_vit_resume_mid_epoch_gives_identical_metrics(vit_runs, cifar_root, tmp_path, monkeypatch):
    assert 8 % STEPS_PER_EPOCH != 0  # stop in the middle of the second epoch
    argv = args("vit", cifar_root, tmp_path / "parts", "ikfad", 0, *VIT_RUNS["ikfad"])
    stop_and_resume("vit", argv, 8, monkeypatch)
    assert records(tmp_path / "parts") == records(vit_runs / "ikfad")


@pytest.mark.parametrize("name", list(CIFAR_RUNS))
def test_cifar_smoke_writes_the_run_contract(cifar_runs, name):
    rows, summary = check_common_contract(cifar_runs / name, "cifar", name, {"val": 20})
    # The test set is looked at once, at the end (the release's cifar/train.py:171): the final weights.
    (test,) = split_of(rows, "test")
    assert (test["step"], test["epoch"]) == (EPOCHS * STEPS_PER_EPOCH, EPOCHS) and rows[-2] == test
    assert summary["test_acc"] == summary["final"]["test"]["acc"] == test["acc"]
    val = split_of(rows, "val")
    best = max(val, key=lambda r: r["acc"])  # the first of equals: fit keeps strict improvements
    assert summary["best"] == {"split": "val", "key": "acc", "value": best["acc"], "step": best["step"]}
    final = rows[-1]  # logged in the last evaluation, after its val and test records
    assert final["split"] == "test_at_best_val" and split_of(rows, "test_at_best_val") == [final]
    assert (final["step"], final["epoch"]) == (EPOCHS * STEPS_PER_EPOCH, EPOCHS)
    assert final["best_step"] == best["step"] and final["best_epoch"] == best["step"] / STEPS_PER_EPOCH
    assert final["val_acc"] == best["acc"] and abs(final["acc"] * 50 - round(final["acc"] * 50)) < 1e-9
    written = json.loads((cifar_runs / name / "summary.json").read_text())["final"]["test_at_best_val"]
    assert {k: v for k, v in written.items() if k != "time_s"} == {k: v for k, v in final.items() if k != "split"}
    assert summary["test_at_best_val"] == written and summary["test_acc_best_val"] == final["acc"]


def test_cifar_reports_the_final_weights_test_accuracy(cifar_runs, cifar_root, tmp_path):
    # The release tests the final weights after the last epoch (cifar/train.py:171): the kit's
    # headline is that number, recomputed here from the last checkpoint's weights, and the
    # report (what scripts/figures.sh renders) shows it as "final test acc".
    from harness.report import report

    test = harness.cifar10.cifar10_splits(cifar_root, dataset_cls=UncheckedCIFAR10, normalize="computed")["test"]
    accs = []
    for name in CIFAR_RUNS:
        model = resnet18(width=4)
        model.load_state_dict(ckpt.load(cifar_runs / name / "checkpoint.pt", torch.device("cpu"))["model"])
        loss, acc = evaluate_on(model, test)
        (record,) = split_of(records(cifar_runs / name), "test")
        assert record["step"] == EPOCHS * STEPS_PER_EPOCH
        assert record["loss"] == pytest.approx(loss, rel=1e-5) and record["acc"] == acc
        accs.append(acc)
    report(cifar_runs, tmp_path / "report")
    lines = (tmp_path / "report" / "results.md").read_text().splitlines()
    head = next(line for line in lines if line.startswith("| optimizer"))
    columns = [c.strip() for c in head.strip("|").split("|")]
    assert "final test acc" in columns and "test acc of the best-val weights" in columns
    cells = {row.strip("|").split("|")[0].strip(): [c.strip() for c in row.strip("|").split("|")]
             for row in lines if row.startswith("| ") and row is not head}
    shown = [float(cells[optimizers.info(name).label][columns.index("final test acc")].split(" ")[0])
             for name in CIFAR_RUNS]
    assert shown == [pytest.approx(a, abs=5e-5) for a in accs]


def test_cifar_tests_the_weights_with_the_best_validation_accuracy(cifar_runs, cifar_root):
    run_dir = cifar_runs / "cd"
    rows = records(run_dir)
    record = split_of(rows, "test_at_best_val")[0]
    saved = torch.load(run_dir / image_classification.BEST_MODEL, weights_only=True)
    assert saved["step"] == record["best_step"] and saved["val_acc"] == record["val_acc"]
    splits = harness.cifar10.cifar10_splits(cifar_root, dataset_cls=UncheckedCIFAR10, normalize="computed")
    model = resnet18(width=4)
    model.load_state_dict(saved["model"])
    loss, acc = evaluate_on(model, splits["val"])  # they are the weights of the best validation record
    val_at_best = [r for r in split_of(rows, "val") if r["step"] == record["best_step"]][0]
    assert loss == pytest.approx(val_at_best["loss"], rel=1e-5) and acc == val_at_best["acc"]
    loss, acc = evaluate_on(model, splits["test"])
    assert loss == pytest.approx(record["loss"], rel=1e-5) and acc == record["acc"]
    # ... and not the final weights (this run's best validation accuracy is before its end).
    assert record["best_step"] < EPOCHS * STEPS_PER_EPOCH
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    assert evaluate_on(model, splits["test"])[0] != pytest.approx(record["loss"], rel=1e-5)


def test_best_weights_on_test_takes_the_current_or_the_saved_weights(tmp_path):
    torch.manual_seed(0)
    run = Run(cfg={"seed": 0}, dir=tmp_path, device=torch.device("cpu"))
    test = TensorDataset(torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,)))
    loader = eval_loader(run, test, 16)
    saved, current = (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10)) for _ in range(2))
    torch.save({"model": saved.state_dict(), "step": 3, "val_acc": 0.5, "val_loss": 2.0}, tmp_path / "best_model.pt")
    before = {k: v.clone() for k, v in current.state_dict().items()}
    for val_acc, weights, best_step in ((0.6, current, 12), (0.5, saved, 3), (0.4, saved, 3)):
        with torch.no_grad():
            record = image_classification.best_weights_on_test(run, current, current, 12, {"split": "val", "acc": val_acc},
                                                    loader, steps_per_epoch=6)
        loss, acc = evaluate_on(weights, test)
        assert record["loss"] == pytest.approx(loss, rel=1e-6) and record["acc"] == acc
        assert (record["best_step"], record["best_epoch"]) == (best_step, best_step / 6)
        assert record["val_acc"] == max(val_acc, 0.5)
    assert all(torch.equal(before[k], v) for k, v in current.state_dict().items())  # training weights untouched


def test_cifar_resume_mid_epoch_gives_identical_metrics_and_best_weights(cifar_runs, cifar_root, tmp_path,
                                                                        monkeypatch):
    argv = args("cifar", cifar_root, tmp_path / "parts", "cd", 1)
    stop_and_resume("cifar", argv, 9, monkeypatch)
    assert records(tmp_path / "parts") == records(cifar_runs / "cd")
    resumed = torch.load(tmp_path / "parts" / "best_model.pt", weights_only=True)
    whole = torch.load(cifar_runs / "cd" / "best_model.pt", weights_only=True)
    assert resumed["step"] == whole["step"]
    assert all(torch.equal(resumed["model"][k], whole["model"][k]) for k in whole["model"])


@pytest.mark.parametrize("exp", ["vit", "cifar"])
def test_missing_dataset_is_a_one_line_error_and_creates_nothing(exp, tmp_path, capsys):
    out = tmp_path / "run"
    assert MAIN[exp](args(exp, tmp_path / "nowhere", out, "adam")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: CIFAR-10 not found") and "--set data.download=true" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--set", "train.gradient_accumulation_steps=3"],
     "train.batch_size 32 (the global batch) must be a positive multiple of ranks x train.gradient_accumulation_steps = 1 x 3"),
    (["--set", "train.evals_per_epoch=4"], "train.evals_per_epoch=4 must divide the 6 steps of an epoch"),
    (["--set", "model.depth=two"], None),
])
def test_bad_settings_are_one_line_errors(cifar_root, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert vit_train.main(args("vit", cifar_root, out, "adam", 0, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert message is None or message in err[0]
    assert not out.exists()


def test_gradient_accumulation_splits_the_global_batch(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert vit_train.main(args("vit", cifar_root, out, "adam", 0, "--set", "train.gradient_accumulation_steps=2",
                               "--set", "train.epochs=1")) == 0
    assert "batch 32 (16 per rank and micro-batch), 6 steps/epoch" in capsys.readouterr().out
    assert [r["step"] for r in split_of(records(out), "val")] == [0, 6]


def test_torchrun_two_ranks_match_one_process(vit_runs, cifar_root, tmp_path):
    """Each rank takes half of every global batch: without dropout, two ranks follow the
    single-process run (same images per step, gradients averaged) up to rounding."""
    script = tmp_path / "vit_unchecked.py"  # the generated files need the unchecked dataset class
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import harness.cifar10\nfrom tests.cifar_fixture import UncheckedCIFAR10\n"
        "harness.cifar10.DATASET_CLASS = UncheckedCIFAR10\n"
        "from vit.train import main\nraise SystemExit(main(sys.argv[1:]))\n")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29547", str(script), *args("vit", cifar_root, out, "adam", 0,
                                                                        *VIT_RUNS["adam"])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batch 32 (16 per rank and micro-batch), 6 steps/epoch" in proc.stdout
    ddp, single = records(out), records(vit_runs / "adam")
    assert [(r["step"], r["split"]) for r in ddp] == [(r["step"], r["split"]) for r in single]  # logged once
    for a, b in zip(ddp, single):
        if a["split"] != "train":  # train records are the mean over rank 0's half of each batch
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["acc"] == b["acc"]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------- the configs

def read(exp, name):
    return yaml.safe_load((ROOT / exp / "configs" / name).read_text())


def test_paper_protocols():
    vit_cfg, cifar_cfg = read("vit", "paper.yaml"), read("cifar", "paper.yaml")
    assert vit_cfg["seeds"] == list(range(10)) and cifar_cfg["seeds"] == list(range(1, 11))
    assert vit_cfg["model"] == {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 9, "num_heads": 3,
                                "drop_rate": 0.1}
    assert cifar_cfg["model"] == {"width": 64}
    # normalisation: vit's release uses fixed constants, cifar's computes them from the training images
    for cfg, epochs, batch, normalize in ((vit_cfg, 50, 128, "fixed"), (cifar_cfg, 40, 64, "computed")):
        t = cfg["train"]
        assert (t["epochs"], t["batch_size"], t["precision"], t["grad_clip"]) == (epochs, batch, "fp32", 0.0)
        assert t["evals_per_epoch"] == 1 and t["gradient_accumulation_steps"] == 1
        assert cfg["data"] == {"root": "data/cifar10", "download": False, "subset": 0, "normalize": normalize}
    n = sum(p.numel() for p in build_vit(**vit_cfg["model"]).parameters())
    assert n == 4_028_170
    assert sum(p.numel() for p in resnet18(**cifar_cfg["model"]).parameters()) == 11_173_962


def test_best_configurations_are_the_papers_and_resolve():
    vit_best, cifar_best = read("vit", "best.yaml"), read("cifar", "best.yaml")
    assert set(vit_best) == set(optimizers.NAMES) - {"ldhd"}
    assert set(cifar_best) == {"adam", "msgd", "cd", "ikfad", "cadam"}  # no "0" variants on cifar
    assert vit_best["cadam"] == {"h": 1.967e-3, "gamma": 4.469, "alpha": 0.9138, "c": 2.431e7}
    assert vit_best["ikfad0"] == {"h": 0.07249, "alpha": 0.08986, "mu": 1.264e-5}
    assert cifar_best["cd"] == {"h": 0.0448, "gamma": 0.17, "c": 56814.47}
    assert cifar_best["ikfad"] == {"h": 0.0973, "gamma": 0.40, "alpha": 0.402, "mu": 1.87}
    for exp in ("vit", "cifar"):
        best = read(exp, "best.yaml")
        for name in optimizers.NAMES:
            cfg = config_lib.resolve(exp, name, 0)
            assert cfg["optimizer"] == {"name": name, **best.get(name, {})}


def test_search_spaces():
    tuned = read("vit", "best.yaml")  # the hyperparameters the paper tuned, per optimizer
    for exp, epochs in (("vit", 25), ("cifar", 20)):
        space = read(exp, "space.yaml")
        assert space["trials"] == 100 and space["budget"] == {"train.epochs": epochs}
        paper = config_lib.flatten(read(exp, "paper.yaml"))
        assert set(space["budget"]) <= set(paper)
        assert set(space["optimizers"]) == set(optimizers.NAMES) - {"ldhd"}
        for name, ranges in space["optimizers"].items():
            assert set(ranges) == set(tuned[name]), (exp, name)
            assert set(ranges) <= set(optimizers.hyperparameter_names(name))
            for low, high, scale in ranges.values():
                assert 0 < float(low) < float(high) and scale == "log"
        assert space["optimizers"]["cd"]["h"] == [1e-4, 0.3, "log"]
        assert space["optimizers"]["ikfad"]["mu"] == [1e-8, 10, "log"]
        assert space["optimizers"]["cadam"]["c"] == [1e4, 1e10, "log"]
        assert space["optimizers"]["cadam0"] == {k: v for k, v in space["optimizers"]["cadam"].items() if k != "gamma"}
