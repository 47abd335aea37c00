"""The kit follows the authors' release (rajit906/higher-order-damping-in-ml-v0) where the
paper's numbers depend on it: TF32 per experiment, and what reports say of diverged seeds."""
import pytest
import torch

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
    run_lib.config_mismatch(tmp_path, old, {"train": {"batch_size": 64, "tf32": True}})
    with pytest.raises(run_lib.UsageError, match=r"\(train.tf32\)"):
        run_lib.config_mismatch(tmp_path, old, {"train": {"batch_size": 64, "tf32": False}})
