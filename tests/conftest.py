import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The experiment folders are run from the repo root and are not installed.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("WANDB_MODE", "offline")
# The tests' models are tiny: one thread each is fastest, and subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


import shutil  # noqa: E402

import pytest  # noqa: E402


# Under mutmut (scripts/mutation.sh) each function of the mutated module is a trampoline that sets
# a ContextVar, which torch.compile cannot trace. When the mutated module is one the compiled step
# traces (``_update`` and its sub-steps), the compiled step falls back to the single-tensor loop, so
# the compiled path's tests are skipped; it compiles the same ``_update`` that the single-tensor and
# foreach paths run eagerly. (A mutated module has mutmut's trampoline imported as ``_mutmut_mutated``.)
def _mutated(*modules: str) -> bool:
    import importlib

    return "MUTANT_UNDER_TEST" in os.environ and any(
        hasattr(importlib.import_module(name), "_mutmut_mutated") for name in modules)


_TRACED = ("optimizers._base", "optimizers.cd", "optimizers.ikfad", "optimizers.cadam", "optimizers.ldhd")
COMPILED_STEP_MUTATED = _mutated(*_TRACED)
# The trampolines live in mutmut's own files, so under mutmut they also sit between a warning of
# the fused path and the user's line it names: that attribution is checked on the real code only.
FUSED_PATH_MUTATED = _mutated(*_TRACED, "optimizers._fused")
_UNTRACEABLE = "torch.compile cannot trace mutmut's trampolines"
compiles_update = pytest.mark.skipif(COMPILED_STEP_MUTATED, reason=_UNTRACEABLE)

PATH_OPTIONS = {
    "single": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True),
    "native": dict(fused=True),
    "compiled": dict(fused=True),
}


class StepPath:
    """One code path of our optimizers' step, switched on for a test: the eager
    single-tensor loop or foreach path, or one implementation of the fused path
    (the native C kernels, or ``torch.compile`` of ``_update``, which is the
    CUDA path, run here on the CPU)."""

    def __init__(self, name: str):
        self.name = name
        self.kwargs = PATH_OPTIONS[name]  # the constructor arguments that select it

    def ran(self, optimizer, dtype) -> bool:
        """True when steps of ``optimizer`` (an instance, or a class built with this
        path's arguments) on ``dtype`` CPU tensors take this path: the answer of
        ``code_path``, the one place where ``step`` makes that choice."""
        if isinstance(optimizer, type):
            optimizer = optimizer([torch.zeros(2, dtype=dtype, requires_grad=True)], **self.kwargs)
        return optimizer.code_path(device=torch.device("cpu"), dtype=dtype) == self.name


def _step_path(request, monkeypatch) -> StepPath:
    from optimizers import _native

    if request.param == "native":
        reason = _native.why_unavailable()
        if reason is not None:
            pytest.skip(f"native kernels unavailable: {reason}")
    elif request.param == "compiled":
        if COMPILED_STEP_MUTATED:
            pytest.skip(_UNTRACEABLE)
        # Inductor compiles CPU kernels with a C++ compiler.
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            pytest.skip("no C++ compiler for torch.compile on the CPU")
        monkeypatch.setattr(_native, "ENABLED", False)
    return StepPath(request.param)


@pytest.fixture(params=list(PATH_OPTIONS))
def step_path(request, monkeypatch):
    """Every code path in turn (see StepPath)."""
    return _step_path(request, monkeypatch)


@pytest.fixture(params=["native", "compiled"])
def fused_backend(request, monkeypatch):
    """Each implementation of the fused path in turn (see StepPath)."""
    return _step_path(request, monkeypatch)


def records(run_dir, drop=("time_s",)):
    """A run's ``metrics.jsonl`` records, without the keys in ``drop`` (wall times differ
    between otherwise identical runs)."""
    import json

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.fixture(scope="session")
def nano_data(tmp_path_factory):
    """nano's data prepared from two of the packaged plays, once per test session."""
    from nano.prepare import prepare

    return prepare(source="packaged", out_dir=tmp_path_factory.mktemp("nano") / "data", plays=2)
