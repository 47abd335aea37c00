"""Worker of tests/test_sharded.py, run by ``torchrun --nproc_per_node 2`` (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/sharded_worker.py OUT.json [PATH ...]

For each of LDHD, CD, iKFAD and CADAM it trains a small model (two Linear
layers and a LayerNorm whose sizes do not divide by 2, so the shards are
padded) for a few steps on fixed data, each rank taking half of the global
batch, in two ways:

- FSDP2 (``fully_shard`` on each layer, then the root; DTensor parameters,
  gradients and state), on each of the step paths named on the command line
  (``default``: foreach=None, fused=None; ``fused``; ``foreach``; ``single``);
- ``ZeroRedundancyOptimizer(params, optimizer_class=..., **hp)`` over a DDP
  replica (each rank updates its partition, then broadcasts it).

and once in a single process on the whole batch with the same mean loss (the
reference, computed on rank 0 with the same path). Rank 0 writes, per case,
the relative difference of the parameters and of the optimizer state against
the reference, the state as consolidated on rank 0 (FSDP2: ``get_state_dict``
with ``full_state_dict=True``; ZeRO: ``consolidate_state_dict``), and which
path ``code_path()`` names and how many tensors reached the native kernel. A case that
raises records its error and the others still run; a crash of the process
(e.g. a segfault) fails the whole launch, which the test reports.
"""
from __future__ import annotations

import json
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import optimizers
from optimizers import _native

HYPERPARAMETERS = dict(h=0.1, gamma=0.5, c=10.0, alpha=0.5, mu=0.5)
NAMES = ("ldhd", "cd", "ikfad", "cadam")
CLASSES = {"ldhd": optimizers.LDHD, "cd": optimizers.CD, "ikfad": optimizers.iKFAD, "cadam": optimizers.CADAM}
PATHS = {"default": {}, "fused": dict(fused=True), "foreach": dict(foreach=True),
         "single": dict(foreach=False, fused=False)}
STEPS = 5
GLOBAL_BATCH, IN, HIDDEN, OUT = 8, 5, 7, 3  # 7 and 3 rows: FSDP2 shards dim 0 unevenly and pads


def hyperparameters(name: str) -> dict:
    keys = optimizers.hyperparameter_names(name)
    return {k: v for k, v in HYPERPARAMETERS.items() if k in keys}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(IN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.out = nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def make_model() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # LayerNorm starts at ones/zeros: make its parameters nontrivial
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g)


class NativeCalls:
    """Counts the (q, g, *state) tuples handed to the native kernel, and whether they were
    all plain tensors (a rank's local shards), by wrapping ``optimizers._native.step``."""

    def __init__(self):
        self.tensors, self.plain, self._step = 0, True, _native.step

    def __enter__(self):
        def spy(kernel, dtype, coefficients, tensors):
            self.tensors += len(tensors)
            self.plain &= all(type(t) is torch.Tensor or type(t) is nn.Parameter for ts in tensors for t in ts)
            return self._step(kernel, dtype, coefficients, tensors)

        _native.step = spy
        return self

    def __exit__(self, *exc):
        _native.step = self._step


def train(model, opt, x, y) -> None:
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()  # the mean over this process's examples
        opt.step()


def reference(name: str, path_kwargs: dict):
    """Parameters (by name) and optimizer state (by name) of the single-process run on the whole batch."""
    model = make_model()
    opt = optimizers.build(name, model.parameters(), **hyperparameters(name), **path_kwargs)
    train(model, opt, *data())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    return params, state


def relative(ours: dict, ref: dict) -> float:
    """||ours - ref|| / ||ref|| over all the tensors together (same keys)."""
    assert ours.keys() == ref.keys(), (sorted(ours), sorted(ref))
    num = sum(float((ours[k].double() - ref[k].double()).square().sum()) for k in ref)
    den = sum(float(ref[k].double().square().sum()) for k in ref)
    return (num / den) ** 0.5


def state_relative(ours: dict, ref: dict) -> dict:
    """Per state name, the relative difference over the parameters (``ours[param][name]``)."""
    names = {k for s in ref.values() for k in s}
    return {k: relative({n: s[k] for n, s in ours.items()}, {n: s[k] for n, s in ref.items()}) for k in sorted(names)}


def fsdp_case(name: str, path: str, mesh) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank()
    model = make_model()
    for layer in (model.inp, model.norm, model.out):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = optimizers.build(name, model.parameters(), **hyperparameters(name), **PATHS[path])
    x, y = data()
    half = GLOBAL_BATCH // 2
    with NativeCalls() as native:
        train(model, opt, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    first = next(model.parameters())
    state_types = sorted({type(v).__name__ for s in opt.state.values() for v in s.values()})
    padded = sorted(n for n, p in model.named_parameters() if p.size(0) % 2)
    params = {n: p.full_tensor().detach() for n, p in model.named_parameters()}  # collective: all ranks
    _, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return {}
    ref_params, ref_state = reference(name, PATHS[path])
    return {
        "param_type": type(first).__name__, "is_dtensor": isinstance(first, DTensor), "state_types": state_types,
        "uneven": padded, "code_path": opt.code_path(),
        "native_tensors": native.tensors, "native_plain": native.plain,
        "params": relative(params, ref_params), "moved": relative(ref_params, reference_initial()),
        "state": state_relative({n: osd["state"][n] for n in ref_state}, ref_state),
        "state_keys": sorted(osd["state"]), "full_shapes_match": all(
            osd["state"][n][k].shape == v.shape for n, s in ref_state.items() for k, v in s.items()),
    }


def reference_initial() -> dict:
    return {n: p.detach().clone() for n, p in make_model().named_parameters()}


def zero_case(name: str, path: str) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    model = DistributedDataParallel(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=CLASSES[name],
                                  **hyperparameters(name), **PATHS[path])
    x, y = data()
    half = GLOBAL_BATCH // 2
    with NativeCalls() as native:
        train(model, opt, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    local = sum(len(g["params"]) for g in opt.optim.param_groups)  # this rank's partition
    opt.consolidate_state_dict(to=0)  # collective: all ranks
    counts = [None, None]
    dist.all_gather_object(counts, local)
    if rank != 0:
        return {}
    full = opt.state_dict()
    named = [n for n, _ in model.module.named_parameters()]
    ref_params, ref_state = reference(name, PATHS[path])
    params = {n: p.detach() for n, p in model.module.named_parameters()}
    state = {named[i]: s for i, s in full["state"].items()}
    return {
        "partition": counts, "code_path": opt.optim.code_path(),
        "native_tensors": native.tensors, "native_plain": native.plain, "state_indices": sorted(full["state"]),
        "params": relative(params, ref_params), "moved": relative(ref_params, reference_initial()),
        "state": state_relative({n: state[n] for n in ref_state}, ref_state) if state.keys() == ref_state.keys()
        else {"missing": sorted(set(ref_state) - set(state))},
        "group_h": [g["h"] for g in full["param_groups"]],
    }


def main() -> int:
    out, paths = sys.argv[1], sys.argv[2:] or list(PATHS)
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {"world_size": dist.get_world_size(), "native_unavailable": _native.why_unavailable(), "cases": {}}
    cases = [(f"fsdp2/{n}/{p}", lambda n=n, p=p: fsdp_case(n, p, mesh)) for n in NAMES for p in paths]
    cases += [(f"zero/{n}/{p}", lambda n=n, p=p: zero_case(n, p)) for n in NAMES for p in ("default", "foreach")]
    for key, case in cases:
        try:
            result = case()
        except Exception as error:  # recorded and reported by the test; the remaining cases still run
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        if dist.get_rank() == 0:
            results["cases"][key] = result
        dist.barrier()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
