"""Worker of tests/test_gpu_path.py, run by ``torchrun --nproc_per_node 2`` (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/gpu_path_worker.py OUT.json NANO_DATA TMP [CASE ...]

Evaluation under FSDP2 with shares that do not split evenly over the two ranks, each
against the value one process computes on the whole set (on rank 0, an unsharded copy
of the same weights):

- ``lm``: ``LMEvaluation.mean_loss`` of a sharded nano GPT, 5 validation batches (3 on
  rank 0, 2 on rank 1);
- ``classification``: ``classification_evaluate`` over ``eval_loader`` shards of a
  sharded classifier: 5 items in batches of 2 (2 batches on rank 0, 1 on rank 1) and a
  set of 1 item (none on rank 1);
- ``gpt2``: ``gpt2.train.evaluate`` over ``eval_loader`` shards of a sharded GPT-2: 5
  blocks in batches of 2.

And ``stop_check``: a 2-rank nano run (12 steps, ``log_interval`` 5, evaluations at 0
and 12): the step at which each ``Run.any_rank`` and each ``torch.distributed.all_reduce``
call happened.

The process group times out after 60 s, so a rank left waiting in a collective its
peer never makes fails the case instead of hanging the test. A case that raises records
its error; rank 0 writes the results. The cases named after TMP run (default: all).
"""
from __future__ import annotations

import copy
import datetime
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from harness import parallel as par
from harness.run import Run

ROOT = Path(__file__).resolve().parents[1]


def runs(rank: int, world_size: int, tmp: Path) -> tuple[Run, Run]:
    """(this rank's Run, a one-process Run), CPU, seed 1."""
    return (Run(cfg={"seed": 1}, dir=tmp, device=torch.device("cpu"), rank=rank, world_size=world_size),
            Run(cfg={"seed": 1}, dir=tmp, device=torch.device("cpu")))


def sharded_and_whole(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(``model`` sharded over the ranks by FSDP2, an unsharded copy of the same weights), eval mode."""
    whole = copy.deepcopy(model).eval()
    par.fully_shard_model(model, torch.device("cpu"), dist.get_world_size())
    return model.eval(), whole


def on_both(evaluate, sharded: nn.Module, whole: nn.Module, dist_run: Run, one_run: Run) -> dict:
    with torch.no_grad():
        value = evaluate(dist_run, sharded)
        reference = evaluate(one_run, whole) if dist_run.is_main else None
    return {"sharded": value, "one_rank": reference}


def lm_case(nano_data: str, dist_run: Run, one_run: Run) -> dict:
    import nano
    from harness.data import LMEvaluation
    from harness.token_bins import TokenBins
    from nano.model import GPT, GPTConfig

    bins = TokenBins(nano_data, nano.DATA)
    torch.manual_seed(0)
    sharded, whole = sharded_and_whole(GPT(GPTConfig(block_size=16, vocab_size=bins.vocab_size, n_layer=2,
                                                     n_head=2, n_embd=16)))

    def evaluate(run, model):
        return LMEvaluation(run, bins, 3, 16, 5, ["fixed"]).mean_loss(model, torch.Generator().manual_seed(7))

    return on_both(evaluate, sharded, whole, dist_run, one_run)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 3)])

    def forward(self, x):
        return self.blocks[1](torch.tanh(self.blocks[0](x)))


def classification_case(dist_run: Run, one_run: Run) -> dict:
    from harness.data import classification_evaluate, eval_loader

    g = torch.Generator().manual_seed(3)
    sets = {"val": TensorDataset(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)),
            "tiny": TensorDataset(torch.randn(1, 6, generator=g), torch.randint(0, 3, (1,), generator=g))}
    torch.manual_seed(0)
    sharded, whole = sharded_and_whole(Classifier())

    def evaluate(run, model):
        loaders = {name: eval_loader(run, data, 2) for name, data in sets.items()}
        return classification_evaluate(run, model, loaders, lambda m, batch: (m(batch[0]), batch[1]))

    return on_both(evaluate, sharded, whole, dist_run, one_run)


class Blocks(Dataset):
    def __init__(self, n: int, block: int, vocab: int):
        self.ids = torch.randint(0, vocab, (n, block), generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def gpt2_case(dist_run: Run, one_run: Run) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2.train import evaluate as gpt2_evaluate
    from harness.data import eval_loader

    blocks = Blocks(5, 8, 40)
    torch.manual_seed(0)
    sharded, whole = sharded_and_whole(GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40,
                                                                  n_positions=8)))

    def evaluate(run, model):
        return gpt2_evaluate(run, model, eval_loader(run, blocks, 2))[0]["loss"]

    return on_both(evaluate, sharded, whole, dist_run, one_run)


def stop_check_case(nano_data: str, out: Path) -> dict:
    """The steps at which the loop called ``Run.any_rank`` and ``all_reduce`` in a 12-step run."""
    from harness import loop, run as run_module
    from nano import train as nano_train

    trainers, any_rank_steps, all_reduce_steps = [], [], []

    def step():
        return trainers[0].state.step if trainers else None

    fit, any_rank, all_reduce = loop.Trainer.fit, run_module.Run.any_rank, dist.all_reduce

    def counting_fit(self):
        trainers.append(self)
        return fit(self)

    def counting_any_rank(self, flag):
        any_rank_steps.append(step())
        return any_rank(self, flag)

    def counting_all_reduce(*args, **kwargs):
        all_reduce_steps.append(step())
        return all_reduce(*args, **kwargs)

    loop.Trainer.fit, run_module.Run.any_rank, dist.all_reduce = counting_fit, counting_any_rank, counting_all_reduce
    try:
        status = nano_train.main(["--optimizer", "cd", "--seed", "1", "--config", str(ROOT / "nano/configs/smoke.yaml"),
                                  "--set", f"data.dir={nano_data}", "--set", "train.max_iters=12",
                                  "--set", "train.eval_interval=12", "--set", "train.log_interval=5",
                                  "--out", str(out)])
    finally:
        loop.Trainer.fit, run_module.Run.any_rank, dist.all_reduce = fit, any_rank, all_reduce
    return {"status": status, "any_rank_steps": any_rank_steps, "all_reduce_steps": all_reduce_steps}


def main() -> int:
    out, nano_data, tmp = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dist_run, one_run = runs(rank, world_size, tmp)
    cases = {"lm": lambda: lm_case(nano_data, dist_run, one_run),
             "classification": lambda: classification_case(dist_run, one_run),
             "gpt2": lambda: gpt2_case(dist_run, one_run),
             "stop_check": lambda: stop_check_case(nano_data, tmp / "stop_check")}
    results = {"world_size": world_size}
    for key in sys.argv[4:] or list(cases):
        case = cases[key]
        try:
            results[key] = case()
        except Exception as error:  # recorded and reported by the test
            results[key] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
