"""The oldest torch that pyproject.toml declares (``torch>=X``) runs the optimizers.

Run only when asked for (``-m oldtorch``; .ci/run does): the first run builds a
virtual environment with that torch from the package registry, cached under
``$ND_OLDTORCH_CACHE`` (else ``~/.cache/nonlinear-damping/oldtorch``), and later runs
reuse it. Torch's wheels on PyPI are the CUDA builds, whose ``import torch``
loads the CUDA libraries even on a CPU-only machine, so the environment takes
them too: about 4 GB on disk and a few minutes to download once; the tests
themselves then take under a minute. In it, the generic optimizer battery and
the exact-oracle tests run with the repository's code (every path torch of that
age can run without a compiler cache: single-tensor, foreach, the native kernels,
and the compiled step's bookkeeping).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.oldtorch


def declared_floor() -> str:
    """The X of ``torch>=X`` in pyproject.toml's dependencies."""
    match = re.search(r'"torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml declares no torch>=X"
    return match.group(1)


def oldtorch_python(version: str) -> Path:
    """The Python of a cached venv with torch ``version`` (its latest patch release),
    pytest, numpy<2 (torch of that age was built against numpy 1) and pyyaml (the
    registry test reads the experiments' configs), built on first use."""
    cache = Path(os.environ.get("ND_OLDTORCH_CACHE") or Path.home() / ".cache" / "nonlinear-damping" / "oldtorch")
    venv = cache / f"torch-{version}-py{sys.version_info.major}{sys.version_info.minor}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={version}.*", "pytest", "numpy<2", "pyyaml"],
                       check=True, timeout=3600)
        (venv / ".complete").touch()
    return python


def test_optimizer_tests_pass_on_the_oldest_declared_torch(tmp_path):
    version = declared_floor()
    python = oldtorch_python(version)
    found = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found.startswith(version + "."), found
    env = {**os.environ, "NONLINEAR_DAMPING_CACHE": str(tmp_path / "native")}
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "tests/test_optim_battery.py", "tests/test_optimizers.py", "tests/test_base_units.py",  # the version probe
         "-k", "not digits"],  # digits: scikit-learn
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"torch {found}:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
