"""The kit follows the authors' release (rajit906/higher-order-damping-in-ml-v0) where the
paper's numbers depend on it: TF32 per experiment, and what reports say of diverged seeds."""
import pytest
import torch

from harness import config as config_lib
from harness import run as run_lib

# The release: nano/train.py and owt/train.py (nanoGPT's) set torch.backends.cuda.matmul.allow_tf32
# = True (line 35); vit, sst2, qnli and cifar's train.py set nothing (torch's default: off); gpt2
# follows Hugging Face's run_clm.py, which sets nothing either.
RELEASE_TF32 = {"nano": True, "owt": True, "vit": False, "cifar": False, "bert/sst2": False,
                "bert/qnli": False, "gpt2": False}


@pytest.fixture
def simulated_cuda(monkeypatch):
    """``start()`` believes a GPU is there; the TF32 flags are restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def start_on_cuda(exp, tmp_path, *extra):
    run = run_lib.start(exp, ["--optimizer", "adam", "--seed", "1", "--out", str(tmp_path / "run"), *extra])
    assert run.device.type == "cuda"
    return run


@pytest.mark.parametrize("exp", list(RELEASE_TF32))
def test_tf32_matmuls_per_experiment_as_the_release(simulated_cuda, tmp_path, exp):
    torch.backends.cuda.matmul.allow_tf32 = not RELEASE_TF32[exp]  # whatever came before
    run = start_on_cuda(exp, tmp_path)
    assert torch.backends.cuda.matmul.allow_tf32 is RELEASE_TF32[exp]
    assert run.train.tf32 is RELEASE_TF32[exp]
    assert torch.backends.cudnn.allow_tf32 is True  # torch's default, which no release script changes
    assert not (tmp_path / "run").exists()  # start() writes nothing


@pytest.mark.parametrize("exp", ["vit", "cifar", "bert/sst2", "nano", "owt"])
def test_a_set_override_flips_tf32(simulated_cuda, tmp_path, exp):
    flipped = not RELEASE_TF32[exp]
    start_on_cuda(exp, tmp_path, "--set", f"train.tf32={str(flipped).lower()}")
    assert torch.backends.cuda.matmul.allow_tf32 is flipped


def test_tf32_takes_only_true_or_false(tmp_path):
    with pytest.raises(run_lib.UsageError, match="train.tf32"):
        run_lib.start("vit", ["--optimizer", "adam", "--out", str(tmp_path / "run"), "--set", "train.tf32=1"])


def test_an_older_run_without_the_key_resumes_only_with_tf32_on(tmp_path):
    # Runs started before train.tf32 existed ran with TF32 on (harness/run.py set it for every
    # CUDA run): they match a config with tf32 true (nano, owt) and are refused with false.
    old = {"train": {"batch_size": 64}}
    config_lib.config_mismatch(tmp_path, old, {"train": {"batch_size": 64, "tf32": True}})
    with pytest.raises(run_lib.UsageError, match=r"\(train.tf32\)"):
        config_lib.config_mismatch(tmp_path, old, {"train": {"batch_size": 64, "tf32": False}})


def write_run(path, seed, status, val_losses, optimizer="cd"):
    """A run directory as the training loop leaves it: records of val loss/acc, a summary."""
    import json

    path.mkdir(parents=True)
    records = [{"step": 10 * i, "split": "val", "loss": loss, "acc": 0.5} for i, loss in enumerate(val_losses)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps({"status": status, "experiment": "vit", "optimizer": optimizer,
                                                   "seed": seed, "steps": records[-1]["step"] + 1,
                                                   "wall_time_s": 5.0}))


def test_report_counts_and_marks_a_diverged_seed_and_states_the_averaging_rule(tmp_path):
    from harness.report import report

    runs = tmp_path / "runs"
    write_run(runs / "cd" / "seed1", 1, "completed", [2.0, 1.0])
    write_run(runs / "cd" / "seed2", 2, "completed", [2.0, 3.0])
    write_run(runs / "cd" / "seed3", 3, "diverged", [2.0, 0.5, float("nan")])  # stopped after step 20
    write_run(runs / "adam" / "seed1", 1, "completed", [2.0, 1.5], optimizer="adam")
    report(runs, tmp_path / "out")
    text = (tmp_path / "out" / "results.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ")}
    head = rows["optimizer"]
    cd, adam = rows["CD"], rows["Adam"]
    # By hand: the two completed seeds' best val losses are 1.0 and 2.0 (mean 1.5, std 0.7071);
    # seed 3's 0.5 is not in the mean.
    assert cd[head.index("best val loss")] == "1.5000 ± 0.7071"
    assert cd[head.index("status")] == "completed 2, diverged 1"
    assert cd[head.index("diverged seeds")] == "seed 3 (step 21)"
    assert adam[head.index("status")] == "completed 1" and adam[head.index("diverged seeds")] == "–"
    rule = [line for line in text.splitlines() if line.startswith("Averaging rule:")]
    assert len(rule) == 1 and "completed seeds only" in rule[0] and "keeps training through a NaN" in rule[0]


def test_robustness_table_names_the_diverged_seeds(tmp_path):
    from harness import robustness

    root = tmp_path / "nano"
    for mult, seed, status, losses in ((1.0, 1337, "completed", [2.0, 1.0]), (1.0, 1338, "completed", [2.0, 1.4]),
                                       (10.0, 1337, "completed", [2.0, 1.8]),
                                       (10.0, 1338, "diverged", [2.0, float("nan")])):
        write_run(root / "cd" / robustness.mult_dir(mult) / f"seed{seed}", seed, status, losses)
    md = robustness.table(robustness.collect(root), "loss")
    row = next(line for line in md.splitlines() if line.startswith("| CD |"))
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert cells[3] == "1.2000 ± 0.2828"  # by hand: mean and sample std of 1.0 and 1.4
    assert cells[4] == "1.8000 (1/2 diverged: seed 1338)"
