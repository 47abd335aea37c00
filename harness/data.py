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


def move(batch: Any, device: torch.device) -> Any:
    """Tensors in (nested) tuples/lists/dicts to ``device``. To a GPU, CPU tensors go through
    pinned (page-locked) memory with ``non_blocking=True``, as nanoGPT's ``get_batch`` does:
    the copy is queued and the host runs on (a copy from pageable memory waits for it)."""
    if isinstance(batch, torch.Tensor):
        if torch.device(device).type == "cuda" and batch.device.type == "cpu":
            return (batch if batch.is_pinned() else batch.pin_memory()).to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(b, device) for b in batch)
    if hasattr(batch, "items"):
        return {k: move(v, device) for k, v in batch.items()}
    return batch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (run seed, rank, epoch, ...): the first 64-bit word of numpy's
    ``SeedSequence(keys)``, shifted right by one. Distinct keys of the same length, independent streams.
    Keys of different lengths are not told apart when they differ only by trailing zeros within four
    keys: ``SeedSequence`` pads its entropy with zeros to four words, so ``(s, r, 0)`` is ``(s, r)``.
    The language models' streams are therefore keyed ``(run seed, stream, ...)``: stream 0 the
    training offsets ``(s, 0, rank)``, 1 the fixed validation batches ``(s, 1)``, 2 the fresh ones
    ``(s, 2)``, none of them another's padded form."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def set_generator_state(generator: torch.Generator, state: torch.Tensor) -> None:
    """``generator.set_state(state)`` for a state on any device: ``set_state`` takes only a CPU
    byte tensor, and a checkpoint loaded with ``map_location`` a GPU brings its states there."""
    generator.set_state(state.to("cpu", torch.uint8))


def reduce_sum(run: Run, values: Sequence[float]) -> list[float]:
    """Sum numbers over all ranks (identity in a single process)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=run.device)
    if run.distributed:
        torch.distributed.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- token streams (nano, owt)

class RandomTokenBatches:
    """nanoGPT's batches: ``batch_size`` windows of ``block_size`` tokens at random offsets.

    Offsets come from a generator seeded by ``derive_seed(run seed, 0, rank)`` (stream 0, the
    training data: never the validation batches' seed, on any rank); its state is the data position.
    """

    def __init__(self, bins, batch_size: int, block_size: int, seed: int, rank: int = 0, split: str = "train"):
        self.bins, self.batch_size, self.block_size, self.split = bins, batch_size, block_size, split
        self.generator = torch.Generator().manual_seed(derive_seed(seed, 0, rank))

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.bins.get_batch(self.split, self.batch_size, self.block_size, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        set_generator_state(self.generator, state["generator"])


# Tokens per evaluation forward pass on a GPU: several batches of a small model go through
# at once (fewer, larger kernels; the same per-batch losses to rounding). On a CPU one batch
# per pass: timed on one core with nano's model, 2, 4 or 8 batches per pass were no faster
# (benchmarks/results/nano_cpu.md).
EVAL_TOKENS_PER_FORWARD = {"cuda": 1 << 14}


class LMEvaluation:
    """The validation loss of a language model (``model(x, y)`` returns ``(logits, loss)``).

    Each evaluation is one ``val`` record: ``loss`` is the mean loss over ``eval_iters``
    batches by the first of ``estimators`` (``train.eval_batches``: see
    ``harness.config.ESTIMATORS``), and with more than one,
    ``loss_<estimator>`` holds each one's value. Batches are split over ranks (rank r
    computes batches r, r + K, ...), so a K-GPU run reports what one GPU would.
    ``state_dict`` holds the fresh batches' generator (the training loop checkpoints it).
    """

    def __init__(self, run: Run, bins, batch_size: int, block_size: int, eval_iters: int,
                 estimators=("fixed",), split: str = "val"):
        self.run, self.bins, self.split = run, bins, split
        self.batch_size, self.block_size, self.eval_iters = batch_size, block_size, eval_iters
        self.estimators = tuple(estimators)  # checked by the config's schema (harness.config.TrainConfig)
        self.fresh = torch.Generator().manual_seed(derive_seed(run.seed, 2))

    def _generator(self, estimator: str) -> torch.Generator:
        if estimator == "fresh":
            return self.fresh
        return torch.Generator().manual_seed(derive_seed(self.run.seed, 1))

    def mean_loss(self, model: torch.nn.Module, generator: torch.Generator) -> float:
        """The mean of the ``eval_iters`` batches' mean losses, over all ranks.

        Every rank makes the same number of forward passes (under FSDP2 each one
        all-gathers the parameters, a collective): a rank with one batch fewer than
        another (``eval_iters`` not a multiple of the ranks) makes one more forward on
        batch 0 and drops its loss."""
        run = self.run
        first, mine = [], []  # batch 0 (the padding), this rank's batches
        for k in range(self.eval_iters):  # every rank draws every batch: the generators stay in step
            x, y = self.bins.get_batch(self.split, self.batch_size, self.block_size, generator)
            if k == 0:
                first = [(x, y)]
            if k % run.world_size == run.rank:
                mine.append((x, y))
        tokens = EVAL_TOKENS_PER_FORWARD.get(run.device.type, 0)
        per_forward = max(1, tokens // (self.batch_size * self.block_size))
        chunks = [mine[i: i + per_forward] for i in range(0, len(mine), per_forward)]
        forwards = math.ceil(math.ceil(self.eval_iters / run.world_size) / per_forward)  # the most any rank makes
        total = 0.0
        for i, chunk in enumerate(chunks + [first] * (forwards - len(chunks))):
            x, y = (move(torch.cat(t), run.device) for t in zip(*chunk))
            _, loss = model(x, y)  # the mean over equal-sized batches: the mean of their means
            if i < len(chunks):  # else padding
                total += loss.float().item() * len(chunk)
        (total,) = reduce_sum(run, [total])
        return total / self.eval_iters

    def __call__(self, model: torch.nn.Module, step: int) -> list[dict]:
        losses = {name: self.mean_loss(model, self._generator(name)) for name in self.estimators}
        record = {"split": self.split, "loss": losses[self.estimators[0]]}
        if len(losses) > 1:
            record.update({f"loss_{name}": value for name, value in losses.items()})
        return [record]

    def state_dict(self) -> dict:
        return {"fresh": self.fresh.get_state()}

    def load_state_dict(self, state: dict) -> None:
        set_generator_state(self.fresh, state["fresh"])


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


class EvalShard:
    """One rank's share of a finite evaluation set: iterating yields ``(batch, real)``, the
    loader's next batch and how many of its leading items count (the rest is padding)."""

    def __init__(self, loader: DataLoader, real: list[int]):
        self.loader, self.real = loader, real

    def __len__(self) -> int:
        return len(self.real)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        return zip(self.loader, self.real)


def eval_loader(run: Run, dataset: Dataset, batch_size: int, collate_fn: Optional[Callable] = None,
                loader_kwargs: Optional[dict] = None) -> EvalShard:
    """This rank's share (every ``world_size``-th item) of ``dataset``, in order, unshuffled,
    in batches of ``batch_size``, as ``(batch, real)`` pairs (``EvalShard``).

    Every rank gets ``ceil(len(dataset) / world_size)`` items, so every rank makes as many
    forward passes, of the same sizes (under FSDP2 each forward is a collective): a rank
    whose share is one item short ends with its last item again (item 0 if it has none),
    outside its last batch's ``real`` items, which its evaluation drops."""
    n = len(dataset)
    per_rank = math.ceil(n / run.world_size)
    indices = list(range(run.rank, n, run.world_size))
    mine = len(indices)
    indices += [indices[-1] if indices else 0] * (per_rank - mine)
    starts = range(0, per_rank, batch_size)
    kwargs = {k: v for k, v in (loader_kwargs or {}).items() if k != "persistent_workers"}
    kwargs.setdefault("generator", torch.Generator())  # leave the global RNG (dropout) alone
    loader = DataLoader(dataset, batch_sampler=[indices[k: k + batch_size] for k in starts], collate_fn=collate_fn,
                        **kwargs)
    return EvalShard(loader, [min(batch_size, max(0, mine - k)) for k in starts])


def classification_evaluate(run: Run, model: torch.nn.Module, loaders: dict[str, EvalShard],
                            forward: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """Loss (mean cross entropy) and accuracy per split (``eval_loader``'s shards), summed over ranks.

    ``forward(model, batch) -> (logits, labels)`` with the batch already on the run's device.
    """
    out = []
    for split, loader in loaders.items():
        loss_sum, correct, count = 0.0, 0.0, 0.0
        for batch, real in loader:
            logits, labels = forward(model, move(batch, run.device))
            logits, labels = logits[:real], labels[:real]  # the rest is padding
            loss_sum += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            count += labels.numel()
        loss_sum, correct, count = reduce_sum(run, [loss_sum, correct, count])
        out.append({"split": split, "loss": loss_sum / count, "acc": correct / count})
    return out
