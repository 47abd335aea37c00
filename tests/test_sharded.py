"""Sharded training, two processes under torchrun (gloo, CPU): the optimizers under FSDP2
(``fully_shard``: DTensor parameters, gradients and state) and under
``ZeroRedundancyOptimizer``, and the harness's ``train.parallel: fsdp2``.

Each torchrun launch costs seconds, so the optimizer cases all run in ONE launch of
``tests/sharded_worker.py``, which writes its measurements to a JSON file checked here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharded_worker.py"
NAMES = ("ldhd", "cd", "ikfad", "cadam")
FSDP_PATHS = ("default", "fused", "foreach", "single")
ZERO_PATHS = ("default", "foreach")
# fp32 throughout. The sharded runs differ from the single-process reference only in
# how the gradient's mean is rounded (the average of two half-batch means, reduced
# across ranks, against one mean over the whole batch), about 1e-7 relative per step;
# over the worker's 5 steps we measured at most 2e-7 relative, on the parameters and on
# the state. A rank that stepped on its own half-batch gradient, a shard updated twice
# or not at all, or a state slot misplaced by padding is off by 1e-3 or more.
RTOL = 1e-6


def torchrun(*args, timeout=300, env=None):
    """``torchrun --standalone --nproc_per_node 2``: it picks a free localhost port, so
    parallel test runs do not clash."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The worker's measurements for every (FSDP2 | ZeRO, optimizer, path) case."""
    out = tmp_path_factory.mktemp("sharded") / "results.json"
    proc = torchrun(WORKER, out, *FSDP_PATHS)
    assert proc.returncode == 0, f"the worker failed (status {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def case(results: dict, key: str) -> dict:
    result = results["cases"][key]
    assert "error" not in result, f"{key}: {result['error']}\n{result['traceback']}"
    return result


@pytest.mark.parametrize("path", FSDP_PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_steps_match_one_process(sharded, name, path):
    r = case(sharded, f"fsdp2/{name}/{path}")
    assert sharded["world_size"] == 2
    # It really was sharded: DTensor parameters and state, every parameter's rows padded.
    assert r["is_dtensor"] and r["state_types"] == ["DTensor"], r
    assert r["uneven"] == ["inp.bias", "inp.weight", "norm.bias", "norm.weight", "out.bias", "out.weight"]
    assert r["moved"] > 1e-2  # the parameters moved, so matching the reference says something
    assert r["params"] < RTOL, r
    # get_state_dict(full_state_dict=True) reassembles the state: every parameter, full shapes,
    # the single-process optimizer's values.
    assert r["state_keys"] == r["uneven"] and r["full_shapes_match"]
    expected_state = {"ldhd": ["momentum"], "cd": ["momentum"], "ikfad": ["momentum", "xi"],
                      "cadam": ["momentum", "zeta"]}[name]
    assert sorted(r["state"]) == expected_state
    assert all(v < RTOL for v in r["state"].values()), r["state"]


@pytest.mark.parametrize("path", FSDP_PATHS)
def test_fsdp2_runs_the_requested_path_on_the_local_shards(sharded, path):
    """The default and fused=True steps run the fused path's kernel on each rank's local
    shard (on the CPU the native kernel, where it can be built); foreach and the
    single-tensor loop run no kernel."""
    for name in NAMES:
        kernels = case(sharded, f"fsdp2/{name}/{path}")["kernels"]
        if path in ("foreach", "single"):
            assert kernels == [], (name, kernels)
        elif sharded["native_unavailable"] is None:
            assert kernels == ["native"], (name, kernels)
        else:
            assert kernels in ([], ["compiled"]), (name, kernels)


@pytest.mark.parametrize("path", ZERO_PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_zero_redundancy_steps_and_consolidated_state_match_one_process(sharded, name, path):
    r = case(sharded, f"zero/{name}/{path}")
    # The 6 parameters are split between the ranks, each stepping its own partition...
    assert sum(r["partition"]) == 6 and min(r["partition"]) >= 1, r["partition"]
    assert r["moved"] > 1e-2
    assert r["params"] < RTOL, r
    # ...and consolidate_state_dict() gathers the whole state on rank 0: every parameter's,
    # equal to the single-process optimizer's, with the group's hyperparameters.
    assert r["state_indices"] == [0, 1, 2, 3, 4, 5]
    assert "missing" not in r["state"], r["state"]
    assert all(v < RTOL for v in r["state"].values()), r["state"]
    assert r["group_h"] == [0.1]
    if path == "default" and sharded["native_unavailable"] is None:
        assert r["kernels"] == ["native"]
