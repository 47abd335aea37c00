"""Batch sources for the training loop and the evaluations shared by experiments.

A batch source has ``batches(start)`` (an iterator of micro-batches from
micro-batch number ``start`` on) and ``state_dict``/``load_state_dict`` for
anything else that fixes the data position, so that a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .run import Run


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (run seed, rank, epoch, ...); distinct keys, independent streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def reduce_sum(run: Run, values: Sequence[float]) -> list[float]:
    """Sum numbers over all ranks (identity in a single process)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=run.device)
    if run.distributed:
        torch.distributed.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- token streams (nano, owt)

class RandomTokenBatches:
    """nanoGPT's batches: ``batch_size`` windows of ``block_size`` tokens at random offsets.

    Offsets come from a generator seeded by (run seed, rank); its state is the data position.
    """

    def __init__(self, bins, batch_size: int, block_size: int, seed: int, rank: int = 0, split: str = "train"):
        self.bins, self.batch_size, self.block_size, self.split = bins, batch_size, block_size, split
        self.generator = torch.Generator().manual_seed(derive_seed(seed, rank, 0))

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.bins.get_batch(self.split, self.batch_size, self.block_size, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def lm_evaluate(run: Run, model: torch.nn.Module, bins, batch_size: int, block_size: int, eval_iters: int,
                splits: Sequence[str] = ("val",)) -> list[dict]:
    """Mean loss over ``eval_iters`` batches per split (``model(x, y)`` returns ``(logits, loss)``).

    The batches are the same at every evaluation and on any number of ranks (a generator
    seeded by the run seed; rank r computes batches r, r + K, ...), so successive points of
    a curve differ only through the model and a K-GPU run reports what one GPU would.
    """
    out = []
    for i, split in enumerate(splits):
        gen = torch.Generator().manual_seed(derive_seed(run.seed, 1 + i))
        total = 0.0
        for k in range(eval_iters):
            x, y = bins.get_batch(split, batch_size, block_size, gen)
            if k % run.world_size == run.rank:
                _, loss = model(x.to(run.device), y.to(run.device))
                total += loss.float().item()
        (total,) = reduce_sum(run, [total])
        out.append({"split": split, "loss": total / eval_iters})
    return out


# ---------------------------------------------------------------- finite datasets (vit, cifar, bert)

class _SeededItems(Dataset):
    """``dataset[(index, seed)]`` draws the item's random augmentation from ``seed``.

    Augmentation then depends only on (run seed, epoch, index): not on the number
    of workers, the rank or where a resumed run restarted.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        rng = torch.default_generator  # what torchvision's random transforms draw from
        state = rng.get_state()
        rng.manual_seed(seed)  # far cheaper than torch.manual_seed, which also seeds every GPU
        try:
            return self.dataset[index]
        finally:
            rng.set_state(state)


class EpochBatches:
    """Shuffled passes over a finite dataset, sharded over ranks (as DistributedSampler).

    The order of epoch ``e`` is a permutation seeded by (run seed, e); rank ``r`` of ``w``
    takes every ``w``-th index of it (padded by wrapping so all ranks take the same number
    of batches). The last batch of an epoch may be smaller.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 collate_fn: Optional[Callable] = None, loader_kwargs: Optional[dict] = None):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.collate_fn, self.loader_kwargs = collate_fn, dict(loader_kwargs or {})
        self.per_rank = math.ceil(len(dataset) / world_size)
        self.steps_per_epoch = math.ceil(self.per_rank / batch_size)

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's batches of epoch ``epoch`` as lists of (index, augmentation seed)."""
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch))).tolist()
        order = (order * math.ceil(self.per_rank * self.world_size / n))[: self.per_rank * self.world_size]
        mine = order[self.rank:: self.world_size]
        keys = [(i, derive_seed(self.seed, epoch, i)) for i in mine]
        return [keys[k: k + self.batch_size] for k in range(0, len(keys), self.batch_size)]

    def batches(self, start: int = 0) -> Iterator[Any]:
        epoch, skip = divmod(start, self.steps_per_epoch)
        items = _SeededItems(self.dataset)
        while True:
            plan = self.epoch_batches(epoch)[skip:]
            kwargs = dict(self.loader_kwargs)
            # A DataLoader draws its workers' base seed from a generator, by default torch's
            # global one, which also drives dropout: a private one keeps resumes exact.
            kwargs.setdefault("generator", torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank)))
            loader = DataLoader(items, batch_sampler=plan, collate_fn=self.collate_fn, **kwargs)
            yield from loader
            epoch, skip = epoch + 1, 0

    def state_dict(self) -> dict:
        return {}  # the position is the step count

    def load_state_dict(self, state: dict) -> None:
        pass


def eval_loader(run: Run, dataset: Dataset, batch_size: int, collate_fn: Optional[Callable] = None,
                loader_kwargs: Optional[dict] = None) -> DataLoader:
    """This rank's share (every ``world_size``-th item) of ``dataset``, in order, unshuffled."""
    indices = list(range(run.rank, len(dataset), run.world_size))
    batches = [indices[k: k + batch_size] for k in range(0, len(indices), batch_size)]
    kwargs = {k: v for k, v in (loader_kwargs or {}).items() if k != "persistent_workers"}
    kwargs.setdefault("generator", torch.Generator())  # leave the global RNG (dropout) alone
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, **kwargs)


def classification_evaluate(run: Run, model: torch.nn.Module, loaders: dict[str, DataLoader],
                            forward: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """Loss (mean cross entropy) and accuracy per split, summed over ranks.

    ``forward(model, batch) -> (logits, labels)`` with the batch already on the run's device.
    """
    from .loop import move

    out = []
    for split, loader in loaders.items():
        loss_sum, correct, count = 0.0, 0.0, 0.0
        for batch in loader:
            logits, labels = forward(model, move(batch, run.device))
            loss_sum += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            count += labels.numel()
        loss_sum, correct, count = reduce_sum(run, [loss_sum, correct, count])
        out.append({"split": split, "loss": loss_sum / count, "acc": correct / count})
    return out
