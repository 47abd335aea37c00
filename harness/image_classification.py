"""The CIFAR-10 image-classification recipe that vit and cifar share (``train``).

Each experiment is its model (``vit/model.py``: timm's ViT-tiny; ``cifar/model.py``:
the CIFAR ResNet-18) and its configs; everything else is here, and the one difference
of protocol is configuration, ``train.keep_best`` (cifar's paper.yaml: true):

- every ``train.evals_per_epoch``-th of an epoch: a ``train`` record (mean loss and
  accuracy of the training batches since the previous evaluation, measured on the
  augmented images, dropout on), then ``val`` and, without keep_best, ``test``
  records (mean cross entropy and accuracy over the whole split, eval mode); the
  evaluations per epoch must divide its steps, so the last evaluation is at the
  last step;
- with keep_best, the test set is evaluated in the last evaluation only: a ``test``
  record (the final weights, as the release's ``cifar/train.py:171`` tests them after
  the last epoch), then a ``test_at_best_val`` record: the test loss and accuracy of
  the weights with the best validation accuracy (kept in ``best_model.pt``, as the
  release's ``best.pth``, ``cifar/train.py:160-168``), with their ``best_step``,
  ``best_epoch`` and ``val_acc``, a second number beside the release's;
- ``summary.json``: ``best`` is the lowest validation loss without keep_best (what the
  paper's Optuna sweeps minimise for vit) and the highest validation accuracy with it
  (cifar's checkpoint criterion); both get ``best_val_loss`` and ``best_val_acc``, and
  ``final`` holds the last record of each split. The headline of both is
  ``final.test.acc``, the final weights' test accuracy (also ``test_acc`` in a
  completed run's summary); cifar's
  best-validation weights' is ``final.test_at_best_val.acc`` (also
  ``test_acc_best_val``, and the whole record at ``test_at_best_val``).

``train.batch_size`` is the global batch: the images in one optimizer step, summed over
the ranks and the micro-batches of gradient accumulation, so that a run on K GPUs takes
the same steps on the same batches' worth of images as a run on one (BatchNorm statistics,
in cifar's ResNet, are per rank). It must be divisible by ranks x accumulation steps.
The data are ``harness/cifar10.py``'s splits.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from . import checkpoint as ckpt
from . import parallel
from .cifar10 import NORMALIZE, cifar10_splits, loader_kwargs
from .config import check_amount, check_choice
from .data import EpochBatches, classification_evaluate, eval_loader
from .errors import OtherRankFailed, UsageError
from .logging import write_summary
from .loop import fit
from .run import Run, start

BEST_MODEL = "best_model.pt"  # with train.keep_best: the weights with the best validation accuracy so far
NUM_CLASSES = 10
# The recipe's keys added after runs were started, at the value that does what those runs did
# (see harness.config.BEHAVIOUR_OF_OLDER_RUNS; vit's and cifar's training modules state it).
BEHAVIOUR_OF_OLDER_RUNS = {"data.normalize": "fixed"}


def config_check(model_config: Callable[..., object]) -> Callable[[dict], None]:
    """An experiment's ``check_config`` (see ``harness.config.experiment_module``): its model
    section by ``model_config`` (the experiment's model config, which raises a one-line
    UsageError for a value no model can use), then the recipe's data keys: a negative
    ``data.subset`` or an unknown ``data.normalize`` is a one-line UsageError too."""

    def check_config(cfg: dict) -> None:
        model_config(**cfg["model"])
        check_amount("data.subset", cfg["data"]["subset"])
        check_choice("data.normalize", cfg["data"].get("normalize", "fixed"), NORMALIZE)

    return check_config


def load_cifar10(run: Run) -> dict:
    """CIFAR-10's ``train``/``val``/``test`` datasets on every rank.

    Rank 0 goes first and downloads the archive if ``data.download`` is true; the other
    ranks wait, then read the files rank 0 left (never downloading, so that two
    processes never write the same files). ``data.subset > 0`` keeps the first that many
    items of each split (smoke runs; the train split is already a random permutation).

    Raises:
        UsageError: on the rank that could not load the data (missing or corrupted
            files, failed download); ``OtherRankFailed`` on the others.
    """
    d = run.cfg["data"]
    splits, error = None, None
    for rank0_turn in ((True, False) if run.distributed else (True,)):
        if run.is_main == rank0_turn:
            try:
                splits = cifar10_splits(d["root"], download=d["download"] and run.is_main,
                                            normalize=d.get("normalize", "fixed"))
            except UsageError as e:
                error = e
        if run.any_rank(error is not None):
            raise error or OtherRankFailed(f"another rank could not load CIFAR-10 from {d['root']}")
    if d["subset"] > 0:
        splits = {name: Subset(ds, range(min(d["subset"], len(ds)))) for name, ds in splits.items()}
    return splits


def loss_fn(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict]:
    """Mean cross entropy of a batch, and its accuracy (fraction of correct top-1 predictions)."""
    images, labels = batch
    logits = model(images)
    acc = (logits.argmax(-1) == labels).float().mean()
    return F.cross_entropy(logits, labels), {"acc": acc}


def forward(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch
    return model(images), labels


def best_weights_on_test(run: Run, raw: torch.nn.Module, model: torch.nn.Module, step: int, val_record: dict,
                         test_loader, steps_per_epoch: int) -> dict:
    """cifar's ``test_at_best_val`` record: test loss and accuracy of the weights with the best
    validation accuracy (``raw``: the model unwrapped; ``model``: as the loop runs it).

    Called inside the last evaluation of a run, on every rank (the test set is sharded
    like the validation set). The best weights are the current ones if ``val_record``
    (this evaluation's) beats every earlier validation accuracy (the training loop's
    ``on_best`` saves them right after), else those saved in ``best_model.pt``.
    Being part of that evaluation, the record is logged, checkpointed and resumed
    like any other.
    """
    path = run.dir / BEST_MODEL
    saved = ckpt.load(path) if path.exists() else None
    if saved is None or val_record["acc"] > saved["val_acc"]:  # strictly: as the loop decides
        best_step, val_acc, weights, candidate = step, val_record["acc"], contextlib.nullcontext(), model
    elif parallel.is_sharded(raw):
        # FSDP2 modules cannot be deep-copied: the model holds the saved weights for this
        # evaluation only, then its training weights again.
        best_step, val_acc, candidate = saved["step"], saved["val_acc"], model
        weights = parallel.loaded(raw, saved["model"])
    else:
        best_step, val_acc, weights = saved["step"], saved["val_acc"], contextlib.nullcontext()
        candidate = copy.deepcopy(raw)  # the training weights stay as they are
        candidate.load_state_dict(saved["model"])
        candidate.eval()
    with weights:
        (record,) = classification_evaluate(run, candidate, {"test_at_best_val": test_loader}, forward)
    return {**record, "best_step": best_step, "best_epoch": best_step / steps_per_epoch, "val_acc": val_acc}


def _schedule(run: Run, train: EpochBatches) -> tuple[int, int]:
    """``(optimizer steps per epoch, evaluations per epoch)``; a one-line error unless the
    accumulation steps divide an epoch's micro-batches and the evaluations its steps."""
    accumulation, evals = run.train.gradient_accumulation_steps, run.train.evals_per_epoch
    steps_per_epoch, uneven = divmod(train.steps_per_epoch, accumulation)
    if uneven or steps_per_epoch == 0:
        raise UsageError(f"train.gradient_accumulation_steps={accumulation} must divide the "
                         f"{train.steps_per_epoch} micro-batches of an epoch on each rank")
    if evals < 1 or steps_per_epoch % evals:
        raise UsageError(f"train.evals_per_epoch={evals} must divide the {steps_per_epoch} steps of an epoch")
    return steps_per_epoch, evals


def save_best(run: Run, model_state: dict, record: dict) -> None:
    """``on_best`` with keep_best: the weights in ``best_model.pt``. Rank 0, right after the
    evaluation at ``record["step"]`` improved the validation accuracy; the loop's checkpoint
    follows, so after a crash in between the resumed run redoes these steps and writes the
    same weights again."""
    ckpt.save_atomic({"model": {k: v.detach().to("cpu", copy=True) for k, v in model_state.items()},
                      "step": record["step"], "val_acc": record["acc"], "val_loss": record["loss"]},
                     run.dir / BEST_MODEL)


def train(experiment: str, argv, build_model: Callable[[dict], torch.nn.Module]) -> int:
    """Train ``build_model(cfg["model"])`` on CIFAR-10 as ``experiment`` (its configs, its runs).

    ``train.keep_best`` selects the protocol. true (cifar's): only validation is
    evaluated during training; at the last step the final weights are evaluated on the
    test set (a ``test`` record, the headline) and so are the weights with the best
    validation accuracy (kept in ``best_model.pt``; a ``test_at_best_val`` record).
    false (vit's): validation and test are evaluated at every evaluation point and
    ``best`` is the lowest validation loss.
    """
    run = start(experiment, argv)
    if run is None:
        return 0
    t = run.train
    keep_best = t.keep_best
    micro_batch = run.micro_batch_size()
    splits = load_cifar10(run)

    model = build_model(run.cfg["model"])
    kwargs = loader_kwargs(run.device)
    train = EpochBatches(splits["train"], micro_batch, run.seed, run.rank, run.world_size, loader_kwargs=kwargs)
    steps_per_epoch, evals = _schedule(run, train)
    total_steps = t.epochs * steps_per_epoch
    loaders = {name: eval_loader(run, splits[name], micro_batch, loader_kwargs=kwargs) for name in ("val", "test")}

    def evaluate(net, step):
        last = step == total_steps
        names = ("val", "test") if last or not keep_best else ("val",)
        records = classification_evaluate(run, net, {name: loaders[name] for name in names}, forward)
        if keep_best and last:
            records.append(best_weights_on_test(run, model, net, step, records[0], loaders["test"], steps_per_epoch))
        return records

    n_params = sum(p.numel() for p in model.parameters())
    run.print(f"{experiment}: {type(model).__name__} with {n_params / 1e6:.2f}M parameters; CIFAR-10 "
              + "/".join(f"{len(splits[s])}" for s in ("train", "val", "test")) + " train/val/test images; "
              f"batch {t.batch_size} ({micro_batch} per rank and micro-batch), {steps_per_epoch} steps/epoch "
              f"x {t.epochs} epochs; optimizer {run.cfg['optimizer']}; device {run.device} ({run.precision})")

    summary = fit(
        run, model, train, loss_fn=loss_fn, evaluate=evaluate,
        total_steps=total_steps,
        eval_interval=steps_per_epoch // evals,
        steps_per_epoch=steps_per_epoch,
        select=("val", "acc", "max") if keep_best else ("val", "loss", "min"),
        on_best=(lambda state, record: save_best(run, state, record)) if keep_best else None,
    )
    if run.is_main and summary["status"] == "completed":
        # The headline numbers at the top of summary.json, plainly named.
        summary["test_acc"] = summary["final"]["test"]["acc"]
        run.print(f"test of the final weights: acc {summary['test_acc']:.4f}, loss {summary['final']['test']['loss']:.4f}")
        if "test_at_best_val" in summary["final"]:
            summary["test_at_best_val"] = result = summary["final"]["test_at_best_val"]
            summary["test_acc_best_val"] = result["acc"]
            run.print(f"test of the weights with the best validation accuracy (step {result['best_step']}): "
                      f"acc {result['acc']:.4f}, loss {result['loss']:.4f}")
        write_summary(run.dir, summary)
    return 0
