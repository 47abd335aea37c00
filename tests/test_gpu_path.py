"""The CUDA path, checked on the CPU: what a GPU run does differently from a CPU one, simulated
(a tensor that reports a CUDA device, ``torch.cuda`` answers patched, two gloo ranks for FSDP2).

- generator states loaded onto a GPU (``map_location``) still restore the data and
  evaluation generators;
- every evaluation under FSDP2 makes as many forwards on every rank and gives the
  one-process numbers (``tests/gpu_path_worker.py``, two ranks under torchrun);
- no host synchronisation per step: the stop check of a distributed run only at log
  steps, and batches pinned before their asynchronous copy to a GPU;
- SLURM process mapping: threads from the CPUs the job may use, a rank's GPU from its
  visible GPUs (srun binding one per task: ``cuda:0``), ``--gpus`` naming GPUs that are not
  there a one-line error.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from harness import data as hdata
from harness import launch
from harness.run import Run, start
from harness.token_bins import TokenBins
import nano
from tests.test_sharded import torchrun

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "nano" / "configs" / "smoke.yaml"


class OnCuda(torch.Tensor):
    """A tensor that says it is on ``cuda:0`` (what ``torch.load(map_location="cuda")`` gives),
    holding its values on the CPU: copying it back to the CPU is all it supports."""

    @staticmethod
    def __new__(cls, values: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, values.shape, dtype=values.dtype, device=torch.device("cuda", 0))
        t.values = values
        return t

    def __repr__(self):
        return f"OnCuda({self.values!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
            return args[0].values.to(dtype=kwargs.get("dtype") or args[0].dtype).clone()
        raise RuntimeError(f"{func} is not simulated on the CUDA stand-in")


def on_cuda(state):
    """A (nested) state dict with every tensor 'moved to the GPU'."""
    if isinstance(state, torch.Tensor):
        return OnCuda(state)
    if isinstance(state, dict):
        return {k: on_cuda(v) for k, v in state.items()}
    return state


def test_the_stand_in_fails_as_a_cuda_state_does():
    state = on_cuda(torch.Generator().get_state())
    assert state.device.type == "cuda"
    with pytest.raises(TypeError, match="RNG state must be a torch.ByteTensor"):
        torch.Generator().set_state(state)


def test_generator_states_loaded_onto_a_gpu_restore_the_data_and_evaluation_generators(nano_data, tmp_path):
    bins = TokenBins(nano_data, nano.DATA)
    run = Run(cfg={"seed": 3}, dir=tmp_path, device=torch.device("cpu"))
    data, evaluation = hdata.RandomTokenBatches(bins, 4, 8, seed=3), hdata.LMEvaluation(run, bins, 4, 8, 2, ["fresh"])
    batches = data.batches()
    next(batches)
    evaluation.fresh.manual_seed(11)
    saved = {"data": on_cuda(data.state_dict()), "evaluate": on_cuda(evaluation.state_dict())}
    expected_batch = next(batches)
    expected_val = bins.get_batch("val", 4, 8, evaluation.fresh)

    resumed_data = hdata.RandomTokenBatches(bins, 4, 8, seed=3)
    resumed_eval = hdata.LMEvaluation(run, bins, 4, 8, 2, ["fresh"])
    resumed_data.load_state_dict(saved["data"])
    resumed_eval.load_state_dict(saved["evaluate"])
    assert all(torch.equal(a, b) for a, b in zip(next(resumed_data.batches()), expected_batch))
    assert all(torch.equal(a, b) for a, b in zip(bins.get_batch("val", 4, 8, resumed_eval.fresh), expected_val))


# ---------------------------------------------------------------- two ranks: FSDP2 evaluation, the stop check

@pytest.fixture(scope="module")
def two_ranks(nano_data, tmp_path_factory):
    """``tests/gpu_path_worker.py``'s results, two gloo ranks under torchrun."""
    tmp = tmp_path_factory.mktemp("gpu_path")
    out = tmp / "results.json"
    proc = torchrun(ROOT / "tests" / "gpu_path_worker.py", out, nano_data, tmp, timeout=400)
    assert proc.returncode == 0, f"the worker failed (status {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def result(results: dict, key: str) -> dict:
    r = results[key]
    assert "error" not in r, f"{key}: {r['error']}\n{r['traceback']}"
    return r


def test_fsdp2_lm_evaluation_with_uneven_batches_completes_and_equals_one_rank(two_ranks):
    r = result(two_ranks, "lm")  # 5 batches: 3 forwards on rank 0, 2 (+1 dropped) on rank 1
    assert r["sharded"] == pytest.approx(r["one_rank"], rel=1e-6)


def test_fsdp2_classification_with_uneven_shards_completes_and_equals_one_rank(two_ranks):
    r = result(two_ranks, "classification")  # 5 items in batches of 2, and 1 item: ranks get unequal shares
    sharded, whole = r["sharded"], r["one_rank"]
    assert [x["split"] for x in sharded] == [x["split"] for x in whole] == ["val", "tiny"]
    for a, b in zip(sharded, whole):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["acc"] == b["acc"], (a, b)


def test_fsdp2_gpt2_evaluation_with_uneven_shards_completes_and_equals_one_rank(two_ranks):
    r = result(two_ranks, "gpt2")
    assert r["sharded"] == pytest.approx(r["one_rank"], rel=1e-6)


def test_distributed_stop_check_only_at_log_steps(two_ranks):
    """12 steps, log_interval 5, evaluations at 0 and 12: any_rank (an all_reduce whose result the
    host waits for) before the loop (the config check) and at steps 0, 5 and 10 only; no all_reduce
    at any other step."""
    r = result(two_ranks, "stop_check")
    assert r["status"] == 0
    assert r["any_rank_steps"] == [None, 0, 5, 10]
    assert {s for s in r["all_reduce_steps"] if s is not None} <= {0, 5, 10, 12}, r["all_reduce_steps"]


# ---------------------------------------------------------------- batches pinned before asynchronous copies

class Copies:
    """``Tensor.pin_memory`` and ``Tensor.to`` patched: which tensors were pinned, and every copy
    to CUDA as (was the source pinned, non_blocking). No copy happens (no GPU here)."""

    def __init__(self, monkeypatch):
        self.pinned, self.copies = set(), []
        to = torch.Tensor.to

        def pin_memory(t, *args, **kwargs):
            copy = t.clone()
            self.pinned.add(id(copy))
            return copy

        def fake_to(t, *args, **kwargs):
            device = kwargs.get("device", args[0] if args else None)
            if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
                self.copies.append((id(t) in self.pinned, kwargs.get("non_blocking", False)))
                return t
            return to(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: id(t) in self.pinned)
        monkeypatch.setattr(torch.Tensor, "to", fake_to)


def test_token_bin_and_bert_batches_are_pinned_before_non_blocking_copies(nano_data, monkeypatch):
    bins = TokenBins(nano_data, nano.DATA)
    token_batch = next(hdata.RandomTokenBatches(bins, 4, 8, seed=1).batches())
    bert_batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5),
                  "labels": torch.zeros(2, dtype=torch.long)}
    copies = Copies(monkeypatch)
    for batch, tensors in ((token_batch, 2), (bert_batch, 3)):
        copies.copies.clear()
        hdata.move(batch, torch.device("cuda", 0))
        assert copies.copies == [(True, True)] * tensors


def test_batches_stay_as_they_are_on_the_cpu(monkeypatch):
    copies = Copies(monkeypatch)
    x = torch.arange(4)
    assert hdata.move((x,), torch.device("cpu"))[0] is x and not copies.pinned


# ---------------------------------------------------------------- SLURM process mapping

def test_threads_come_from_the_cpus_the_job_may_use(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5}, raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert launch.plan_slots(["0"]) == (["0"], 2)
    assert launch.plan_slots([]) == ([None, None], 1)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # fewer than the affinity mask: the allocation wins
    assert launch.plan_slots(["0"]) == (["0"], 1)


@pytest.fixture
def tf32_kept(monkeypatch):
    """start() switches TF32 on when it finds CUDA: the process's settings are put back."""
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda value: None)
    saved = [(module, name, getattr(module, name)) for module in (torch.backends.cuda.matmul, torch.backends.cudnn)
             for name in ("fp32_precision", "allow_tf32") if hasattr(module, name)]
    yield
    for module, name, value in saved:
        setattr(module, name, value)


@pytest.mark.parametrize("env, visible, expected", [
    # srun without torchrun, one GPU bound per task (CUDA_VISIBLE_DEVICES holds just that one)
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "MASTER_ADDR": "127.0.0.1"}, 1, (3, 4, "cuda:0")),
    # torchrun, the node's 4 GPUs visible to every rank
    ({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}, 4, (5, 8, "cuda:1")),
])
def test_a_rank_uses_a_gpu_it_can_see(env, visible, expected, tmp_path, monkeypatch, tf32_kept):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "MASTER_ADDR"):
        monkeypatch.setenv(key, "")  # recorded, so that the test's end restores it (start() sets some)
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # no process group to start
    run = start("nano", ["--optimizer", "cd", "--config", str(SMOKE), "--out", str(tmp_path / "run")])
    assert (run.rank, run.world_size, str(run.device)) == expected
    assert [str(d) for d in chosen] == [expected[2]]


@pytest.mark.parametrize("cuda, visible, problem", [
    (False, 0, "--gpus 0,1: no CUDA GPU is visible here"),
    (True, 1, "--gpus 0,1: GPU 1 is not visible here; valid ids (comma-separated): 0"),
])
def test_gpus_that_are_not_there_are_a_one_line_error(cuda, visible, problem, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    runs = tmp_path / "runs"
    assert launch.main(["nano", "--config", str(SMOKE), "--optimizers", "cd", "--seeds", "1", "--gpus", "0,1",
                        "--runs-dir", str(runs), "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {problem}"), err
    assert not runs.exists()


def test_gpus_name_the_ids_of_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # e.g. a SLURM job's two GPUs
    assert launch._gpus(None) == ["2", "3"] and launch._gpus("3") == ["3"]
    with pytest.raises(launch.UsageError, match="GPU 0 is not visible here; valid ids"):
        launch._gpus("0")
