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
    """The default and fused=True steps run the native kernel (where it can be built) on each
    rank's local shards, plain tensors, all 6 parameters in each of the 5 steps; foreach and
    the single-tensor loop hand it nothing."""
    native = sharded["native_unavailable"] is None
    for name in NAMES:
        r = case(sharded, f"fsdp2/{name}/{path}")
        if path in ("foreach", "single"):
            assert (r["code_path"], r["native_tensors"]) == (path, 0), (name, r)
        elif native:
            assert (r["code_path"], r["native_tensors"], r["native_plain"]) == ("native", 6 * 5, True), (name, r)
        else:
            assert r["code_path"] in ("compiled", "single") and r["native_tensors"] == 0, (name, r)


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
    if path == "default" and sharded["native_unavailable"] is None:  # each rank its own partition
        assert r["code_path"] == "native" and r["native_tensors"] == r["partition"][0] * 5, r


# ---------------------------------------------------------------------------------------------
# The harness: train.parallel=fsdp2 against ddp, and kill-and-resume under fsdp2
# ---------------------------------------------------------------------------------------------

SMOKE = ROOT / "nano" / "configs" / "smoke.yaml"
STOP_AFTER_ENV, EXIT_INTERRUPTED = "HARNESS_STOP_AFTER_STEPS", 75  # harness.loop's, as a user sees them


def nano_command(data, out, parallel):
    # Gradient accumulation too: FSDP2 has no no_sync(), the harness defers the
    # reduce-scatter instead; the smoke config clips the gradient norm (grad_clip 1.0).
    return ["-m", "nano.train", "--optimizer", "cadam", "--seed", "1", "--config", SMOKE,
            "--set", f"data.dir={data}", "--set", f"train.parallel={parallel}",
            "--set", "train.gradient_accumulation_steps=2", "--set", "train.max_iters=20", "--out", out]


def torchrun_async(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc, timeout=300):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def run_records(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def test_fsdp2_run_matches_ddp_and_resumes_exactly(nano_data, tmp_path):
    import torch

    ddp, whole, parts = tmp_path / "ddp", tmp_path / "fsdp2", tmp_path / "fsdp2-resumed"
    # Three launches at once: most of a launch is start-up, which overlaps.
    procs = {"ddp": torchrun_async(*nano_command(nano_data, ddp, "ddp")),
             "fsdp2": torchrun_async(*nano_command(nano_data, whole, "fsdp2")),
             "stopped": torchrun_async(*nano_command(nano_data, parts, "fsdp2"), env={STOP_AFTER_ENV: "13"})}
    done = {name: finish(proc) for name, proc in procs.items()}
    for name in ("ddp", "fsdp2"):
        assert done[name][0] == 0, f"{name}: status {done[name][0]}\n{done[name][1][-3000:]}"
    assert done["stopped"][0] != 0  # interrupted as asked (status 75 on both ranks)
    assert json.loads((parts / "summary.json").read_text())["status"] == "interrupted"
    resumed = finish(torchrun_async(*nano_command(nano_data, parts, "fsdp2")))
    assert resumed[0] == 0, resumed[1][-3000:]

    # FSDP2 takes the updates DDP takes, to rounding (the gradients are reduced in another order).
    a, b = run_records(ddp), run_records(whole)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert [r["step"] for r in b if r["split"] == "val"] == [0, 10, 20] and b[-1]["loss"] < b[0]["loss"]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x, y)
    summary = json.loads((whole / "summary.json").read_text())
    assert (summary["status"], summary["world_size"], summary["steps"]) == ("completed", 2, 20)

    # Resumed from the step-13 checkpoint, the run logs exactly what the uninterrupted one did.
    assert run_records(parts) == b

    # The checkpoint is the full, single-process format: DDP's keys, shapes and param groups, the
    # optimizer state keyed by parameter index, and it loads into the unsharded model.
    c_ddp, c_fsdp = (torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=True) for d in (ddp, whole))
    assert {k: v.shape for k, v in c_fsdp["model"].items()} == {k: v.shape for k, v in c_ddp["model"].items()}
    assert all(type(v) is torch.Tensor for v in c_fsdp["model"].values())
    assert max((c_fsdp["model"][k] - v).abs().max().item() for k, v in c_ddp["model"].items()) < 1e-5
    o_ddp, o_fsdp = c_ddp["optimizer"], c_fsdp["optimizer"]
    assert o_fsdp["param_groups"] == o_ddp["param_groups"]
    assert sorted(o_fsdp["state"]) == sorted(o_ddp["state"]) == list(range(len(o_ddp["param_groups"][0]["params"])))
    for i, state in o_ddp["state"].items():
        for name, value in state.items():
            assert type(o_fsdp["state"][i][name]) is torch.Tensor and o_fsdp["state"][i][name].shape == value.shape
            assert torch.allclose(o_fsdp["state"][i][name], value, rtol=1e-4, atol=1e-7), (i, name)
    from nano.model import GPT, GPTConfig

    cfg = json.loads(json.dumps(c_fsdp["config"]["model"]))
    model = GPT(GPTConfig(**{**cfg, "vocab_size": c_fsdp["model"]["lm_head.weight"].shape[0]}))
    model.load_state_dict(c_fsdp["model"])  # strict


def test_bad_parallel_value_is_a_one_line_error(nano_data, tmp_path, capsys):
    from nano import train as nano_train

    assert nano_train.main(["--optimizer", "cadam", "--config", str(SMOKE), "--set", f"data.dir={nano_data}",
                            "--set", "train.parallel=zero", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: train.parallel must be ddp or fsdp2, got 'zero'"]
    assert not (tmp_path / "x").exists()


def test_cifar_fsdp2_matches_ddp_batchnorm_and_best_weights_included(tmp_path):
    """cifar's ResNet (BatchNorm buffers, which FSDP2 does not synchronise and DDP does) and its
    best-validation weights (saved by on_best from the gathered full state, evaluated on the
    test set in place, as FSDP2 modules cannot be deep-copied) under fsdp2, against ddp."""
    import torch

    from tests.cifar_fixture import make_fake_cifar10

    root = make_fake_cifar10(tmp_path / "cifar10", n_train=200, n_test=50, seed=7)
    script = tmp_path / "cifar_unchecked.py"  # the generated files need the unchecked dataset class
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import harness.cifar10\nfrom tests.cifar_fixture import UncheckedCIFAR10\n"
        "harness.cifar10.DATASET_CLASS = UncheckedCIFAR10\n"
        "from cifar.train import main\nraise SystemExit(main(sys.argv[1:]))\n")
    runs = {}
    for parallel in ("ddp", "fsdp2"):
        out = tmp_path / parallel
        runs[parallel] = torchrun_async(script, "--optimizer", "cd", "--seed", "1", "--config",
                                        ROOT / "cifar" / "configs" / "smoke.yaml", "--set", f"data.root={root}",
                                        "--set", f"train.parallel={parallel}", "--out", out)
    for parallel, proc in runs.items():
        status, err = finish(proc)
        assert status == 0, f"{parallel}: status {status}\n{err[-3000:]}"
    a, b = run_records(tmp_path / "ddp"), run_records(tmp_path / "fsdp2")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert b[-1]["split"] == "test_at_best_val"
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["acc"] == x["acc"], (x, y)
        assert y.get("best_step") == x.get("best_step")
    best = {p: torch.load(tmp_path / p / "best_model.pt", map_location="cpu", weights_only=True) for p in runs}
    assert best["fsdp2"]["model"].keys() == best["ddp"]["model"].keys()
    for k, v in best["ddp"]["model"].items():
        w = best["fsdp2"]["model"][k]
        assert type(w) is torch.Tensor and w.shape == v.shape and torch.allclose(w.double(), v.double(), rtol=1e-4,
                                                                                  atol=1e-6), k
