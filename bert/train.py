"""Train DistilBERT on a GLUE task with one optimizer: the paper's bert experiment.

    python -m bert.train --task sst2 --optimizer ikfad --seed 0 [--config FILE] [--set key=value ...] [--out DIR]
    torchrun --nproc_per_node 4 -m bert.train --task qnli --optimizer cadam --seed 1

- ``--task sst2``: ``DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))``
  trained from random initialisation on SST-2 (single sentences).
- ``--task qnli``: pretrained ``distilbert-base-uncased`` with a fresh 2-way head,
  fine-tuned on QNLI ((question, sentence) pairs).

Both: GLUE's train+validation merged and split 70/15/15 (``bert/data.py``), batch
16, 2 epochs, fp32, no clipping, constant step size. Validation and test loss and
accuracy at step 0, every ``steps_per_epoch // evals_per_epoch`` steps counted from
the start (10 times per epoch: the release's qnli cadence, qnli/train.py:139,166) and
at each epoch's end (the release's validation in qnli/train.py:185 and
sst2/train.py:152; sst2 has no other), so the last evaluation follows the last step
and the final test accuracy is the trained model's, like the release's single test
after training (qnli/train.py:215, sst2/train.py:184).

The protocol is ``bert/configs/<task>/paper.yaml``, the optimizer's
hyperparameters default to ``bert/configs/<task>/best.yaml`` and the
run directory (default ``runs/bert/<task>/<optimizer>/seed<S>``) gets
``config.yaml``, ``metrics.jsonl``, ``summary.json`` and ``checkpoint.pt``;
re-running the command resumes it. The run's ``experiment`` is ``bert-<task>``, so
reports keep the tasks apart.

``train.batch_size`` is the number of examples per optimizer update, whatever the
number of processes: each of K ranks takes ``batch_size / (K * accumulation)`` of
them, and together the ranks take exactly the examples a single process would
(``harness.data.EpochBatches`` deals every K-th index of the epoch's permutation).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from bert import PREPARE
from bert.data import collate_fn, glue_splits, load_tokenizer
from bert.model import ModelConfig, build_model
from harness.config import check_count
from harness.data import EpochBatches, classification_evaluate, eval_loader
from harness.errors import OtherRankFailed, UsageError, command
from harness.loop import fit
from harness.run import Run, start

# model.* keys that are not DistilBertConfig fields.
NOT_CONFIG_FIELDS = ("pretrained",)


def check_config(cfg: dict) -> None:
    """bert's own keys: the model section by its model config (``bert.model.ModelConfig``) and
    the sequence length; a one-line UsageError for a value no run can use (called by
    ``harness.config.resolve``)."""
    ModelConfig(**cfg["model"])
    check_count("data.max_length", cfg["data"]["max_length"])


@contextlib.contextmanager
def fetch_hint(prepare: str, alternative: str = ""):
    """Add the command that downloads what is missing (``prepare``) to a UsageError raised inside."""
    try:
        yield
    except UsageError as e:
        raise UsageError(f"{e} (`{prepare}` fetches it where the network is reachable"
                         f"{alternative})") from None


def load_splits(run: Run, task: str, tokenizer, data_cfg: dict) -> dict:
    """The tokenized train/val/test splits: rank 0 builds the disk cache, then the others read it.

    A UsageError on rank 0 (no network, a bad ``data.raw``) is passed to every rank,
    so that all of them stop instead of waiting for each other.
    """
    kwargs = dict(cache_dir=data_cfg["cache_dir"], raw=data_cfg["raw"], max_length=int(data_cfg["max_length"]))
    splits, error = None, None
    if run.is_main:
        try:
            with fetch_hint(PREPARE.format(task=task), "; or --set data.raw=DIR, a save_to_disk copy of GLUE"):
                splits = glue_splits(task, tokenizer, **kwargs)
        except UsageError as e:
            error = str(e)
    if run.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UsageError(error) if run.is_main else OtherRankFailed(error)
    return splits if splits is not None else glue_splits(task, tokenizer, **kwargs)


def by_length(dataset):
    """``dataset`` reordered by sequence length: evaluation batches then need little padding.

    Evaluation sums losses and correct predictions, so the order does not change the result.
    """
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    return dataset.select(np.argsort(lengths, kind="stable").tolist())


def model_overrides(model_cfg: dict, task: str, vocab_size: int) -> dict:
    """The DistilBertConfig fields set in ``model.*`` (null means DistilBERT's default)."""
    overrides = {k: v for k, v in model_cfg.items() if k not in NOT_CONFIG_FIELDS and v is not None}
    if task == "sst2":
        # From scratch the embedding table must match the tokenizer (30522 for distilbert-base-uncased).
        overrides.setdefault("vocab_size", vocab_size)
    return overrides


def forward(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, 2), labels (B,)) of a collated batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits, batch["labels"]


def loss_fn(model, batch) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy (nats) of the batch and its accuracy."""
    logits, labels = forward(model, batch)
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"acc": (logits.argmax(-1) == labels).float().mean()}


@command
def main(argv: Optional[list[str]] = None) -> int:
    run = start("bert", argv)  # the task comes from --task
    if run is None:
        return 0
    task = run.experiment.task
    d, m, t = run.cfg["data"], run.cfg["model"], run.train
    micro = run.micro_batch_size()
    with fetch_hint(PREPARE.format(task=task)):
        tokenizer = load_tokenizer(d["tokenizer"])
    splits = load_splits(run, task, tokenizer, d)
    # Seeded by start(): every rank draws the same initial weights.
    with fetch_hint(PREPARE.format(task=task)):
        model = build_model(task, pretrained=m.get("pretrained"),
                            config_overrides=model_overrides(m, task, len(tokenizer)))
    n_params = sum(p.numel() for p in model.parameters())
    run.print(f"bert-{task}: DistilBERT with {n_params / 1e6:.2f}M parameters "
              f"({'pretrained ' + str(m['pretrained']) if task == 'qnli' else 'random init'}), "
              f"{', '.join(f'{k} {len(v)}' for k, v in splits.items())} examples, "
              f"optimizer {run.cfg['optimizer']}, device {run.device} ({run.precision}), {run.world_size} rank(s)")

    collate = collate_fn(tokenizer)
    train = EpochBatches(splits["train"], micro, run.seed, run.rank, run.world_size, collate_fn=collate)
    accumulation = t.gradient_accumulation_steps
    steps_per_epoch = math.ceil(train.steps_per_epoch / accumulation)
    # Every steps_per_epoch // evals_per_epoch steps (counted from the start of training, as the
    # release's global_step % log_interval), plus the untrained model's at step 0 and each epoch's
    # end: the interval need not divide an epoch, and the last evaluation must follow the last step.
    eval_interval = max(1, steps_per_epoch // t.evals_per_epoch)
    total_steps = t.epochs * steps_per_epoch
    loaders = {name: eval_loader(run, by_length(splits[name]), t.eval_batch_size, collate_fn=collate)
               for name in ("val", "test")}
    fit(
        run, model, train,
        loss_fn=loss_fn,
        evaluate=lambda model, step: classification_evaluate(run, model, loaders, forward),
        total_steps=total_steps,
        eval_interval=eval_interval,
        also_evaluate_at=range(steps_per_epoch, total_steps + 1, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        select=("val", "loss", "min"),  # the sweeps' objective: best validation loss
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
