"""Data parallelism for the training loop: DDP (replicas) or FSDP2 (sharded), ``train.parallel``.

``ddp`` (the default) keeps a full replica of the model, gradients and optimizer
state on every rank and all-reduces the gradients. ``fsdp2`` shards them instead
(``torch.distributed.fsdp.fully_shard``: each parameter becomes a DTensor split
along dim 0 over the ranks, all-gathered for the forward and backward passes and
reduce-scattered after), for models whose training state outgrows one GPU. Both
take the same optimizer steps on the same global batch, so the metrics agree to
rounding.

With ``fsdp2`` the checkpoint keeps the format of a single-process run: the
full model ``state_dict()`` and the full optimizer ``state_dict()`` (state keyed
by parameter index), gathered to rank 0 on the CPU with
``torch.distributed.checkpoint.state_dict``, and loaded back (re-sharded) the same way.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

PARALLEL = ("ddp", "fsdp2")

__all__ = ["PARALLEL", "shard_units", "fully_shard_model", "full_state_dicts", "full_model_state_dict", "loaded",
           "load_full_state_dicts", "is_sharded"]


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` was sharded by ``fully_shard`` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _direct_params(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters(recurse=False)}


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules ``fully_shard_model`` shards on their own, before the root: each
    element of the outermost ``nn.ModuleList``s (a transformer's blocks: nano's
    ``transformer.h``, Hugging Face GPT-2's ``transformer.h``, DistilBERT's
    ``transformer.layer``, ...) that holds parameters shared with no module outside it
    (a tied embedding stays with the root)."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                units.extend(m for m in child if any(True for _ in m.parameters()))
            else:
                visit(child)

    visit(model)
    kept = []
    for unit in units:
        inside = {id(m) for m in unit.modules()}
        outside = set().union(*(_direct_params(m) for m in model.modules() if id(m) not in inside))
        if not ({id(p) for p in unit.parameters()} & outside):
            kept.append(unit)
    return kept


def fully_shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Shard ``model`` in place over ``world_size`` ranks (one mesh dimension): each of
    ``shard_units(model)`` as its own FSDP2 unit (its parameters are all-gathered just
    for its own forward and backward, so only one block is unsharded at a time), then
    the root with everything else. Returns ``model`` (now also an ``FSDPModule``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (its groups, in turn), a tied parameter under
    its first name: the index order of ``optimizer.state_dict()``."""
    names = {}
    for name, p in model.named_parameters():  # named_parameters() skips a tied repeat
        names.setdefault(id(p), name)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _fqn_to_index(optim_state: dict, names: list[str]) -> dict:
    """An optimizer state dict keyed by parameter names (``get_state_dict``'s) -> keyed by
    index (``Optimizer.state_dict()``'s); ``names`` from ``_param_names``."""
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in optim_state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in optim_state["param_groups"]],
    }


def _index_to_fqn(optim_state: dict, names: list[str]) -> dict:
    """The inverse of ``_fqn_to_index``."""
    return {
        "state": {names[i]: value for i, value in optim_state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                         for group in optim_state["param_groups"]],
    }


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(model.state_dict(), optimizer.state_dict())`` of a sharded model as a single process
    would have them: full CPU tensors, on rank 0 (other ranks get empty dicts). A collective:
    every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not optim_state:
        return model_state, optim_state
    return model_state, _fqn_to_index(optim_state, _param_names(model, optimizer))


def full_model_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` of a sharded model as a single process would have it: full CPU
    tensors, on rank 0 (other ranks get an empty dict). A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def loaded(model: nn.Module, model_state: dict):
    """Within the block, a sharded ``model`` holds the full ``model_state`` (loaded on every
    rank, each keeping its shards); after it, its own weights and buffers again. For
    evaluating other weights: FSDP2 modules cannot be deep-copied. Every rank enters it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    own = {k: v.detach().clone() for k, v in get_model_state_dict(model).items()}  # local shards: cheap
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    try:
        yield model
    finally:
        set_model_state_dict(model, own)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optim_state: dict) -> None:
    """Load full state dicts (``full_state_dicts``'s, or a single-process run's) into a sharded
    model and its optimizer, each rank keeping its shards. Every rank calls it with the same dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict=_index_to_fqn(optim_state, _param_names(model, optimizer)),
                   options=StateDictOptions(full_state_dict=True))
