"""Fine-tune GPT-2 small on WikiText-103 with one optimizer: the gpt2 experiment (ours, beyond the paper).

    python -m gpt2.train --optimizer cadam --seed 1337 [--config FILE] [--set key=value ...] [--out DIR]
    torchrun --nproc_per_node 8 -m gpt2.train --optimizer cadam --seed 1337

Hugging Face's pretrained GPT-2 small (``GPT2LMHeadModel.from_pretrained
("openai-community/gpt2")``, ``gpt2/model.py``) fine-tuned on WikiText-103 (raw) in
blocks of 1024 GPT-2 tokens (``python -m gpt2.data`` prepares them once): 5,000
optimizer updates of 8 blocks each, shuffled passes over the training blocks,
global grad-norm clipping at 1.0, constant step size, bf16 autocast on CUDA.
The protocol is ``gpt2/configs/paper.yaml`` and the optimizer's hyperparameters
default to ``gpt2/configs/best.yaml`` (owt's tuned values: not tuned for gpt2).

What is recorded, every ``train.eval_interval`` updates (and at step 0, the
pretrained model): a ``train`` record (mean training loss since the previous
evaluation), then a ``val`` record with the mean cross entropy ``loss`` (nats per
predicted token) over the first ``train.eval_iters`` batches of validation blocks
(the whole split when it has fewer) and its ``perplexity`` = exp(loss). The
run directory (default ``runs/gpt2/<optimizer>/seed<S>``) gets ``config.yaml``,
``metrics.jsonl``, ``summary.json`` and ``checkpoint.pt``; re-running the command
resumes it, mid-epoch included.

``train.batch_size`` is the global batch: the blocks of one optimizer update,
summed over the ranks and the micro-batches of gradient accumulation, so a run on
K GPUs takes the same updates on the same blocks as a run on one.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.data import Subset

from gpt2 import PREPARE
from gpt2 import data as wikitext
from gpt2.model import ModelConfig, build_model, flops_per_token
from harness.config import check_count
from harness.data import EpochBatches, eval_loader, move, reduce_sum
from harness.errors import UsageError, command
from harness.loop import fit
from harness.run import Run, start


def check_config(cfg: dict) -> None:
    """gpt2's own keys: the model section by its model config (``gpt2.model.ModelConfig``) and
    the block length; a one-line UsageError for a value no run can use (called by
    ``harness.config.resolve``)."""
    ModelConfig(**cfg["model"])
    check_count("data.block_size", cfg["data"]["block_size"])


def load_blocks(cache_dir: str, block_size: int) -> tuple[dict, dict]:
    """(``{"train", "val"}`` LMBlocks, the cache's meta) from a prepared cache; never builds one."""
    meta = wikitext.read_meta(cache_dir)
    if meta is None:
        hint = PREPARE if str(cache_dir).rstrip("/") == "data/gpt2" else f"{PREPARE} --cache-dir {cache_dir}"
        raise UsageError(f"dataset {cache_dir} is not prepared; run `{hint}` (add --raw DIR offline)")
    return wikitext.lm_splits(cache_dir, block_size), meta


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float."""
    return math.exp(loss) if loss < 700 else math.inf


def loss_fn(model, batch) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross entropy (nats) of a batch of blocks."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss, {}


def evaluate(run: Run, model, loader) -> list[dict]:
    """Validation loss (mean over every predicted token, all ranks) and perplexity."""
    total, count = 0.0, 0.0
    for batch, real in loader:  # blocks after the first ``real`` are padding (see eval_loader)
        batch = move(batch, run.device)
        labels = batch["labels"].clone()
        labels[real:] = -100  # the ignored label: no loss
        loss = model(input_ids=batch["input_ids"], labels=labels).loss
        if real:
            predicted = labels[:real, 1:].numel()  # the model predicts tokens 2..T of each block
            total += loss.float().item() * predicted
            count += predicted
    total, count = reduce_sum(run, [total, count])
    loss = total / count
    return [{"split": "val", "loss": loss, "perplexity": perplexity(loss)}]


@command
def main(argv: Optional[list[str]] = None) -> int:
    run = start("gpt2", argv)
    if run is None:
        return 0
    d, m, t = run.cfg["data"], run.cfg["model"], run.train
    block = int(d["block_size"])
    micro = run.micro_batch_size()
    splits, meta = load_blocks(d["cache_dir"], block)
    # Seeded by start(): every rank draws the same initial weights (from scratch).
    model = build_model(ModelConfig(**m), n_positions=max(block, 1024), vocab_size=meta["vocab_size"])
    if meta["vocab_size"] > model.config.vocab_size:
        raise UsageError(f"{d['cache_dir']} holds token ids up to {meta['vocab_size'] - 1}, beyond the "
                         f"model's vocabulary of {model.config.vocab_size}; prepare it with the model's tokenizer")
    if block > model.config.n_positions:
        raise UsageError(f"data.block_size {block} exceeds the model's {model.config.n_positions} positions")
    n_params = sum(p.numel() for p in model.parameters())
    run.print(f"gpt2: GPT2LMHeadModel with {n_params / 1e6:.2f}M parameters "
              f"({'random init' if m['from_scratch'] else 'pretrained ' + str(m['pretrained'])}), "
              f"{len(splits['train']):,} train / {len(splits['val']):,} val blocks of {block} tokens, "
              f"optimizer {run.cfg['optimizer']}, device {run.device} ({run.precision}), {run.world_size} rank(s)")

    # A DataLoader draws a seed from the generator it is given, by default torch's global one,
    # which also drives dropout: a private generator keeps a resumed run's dropout masks those
    # of the uninterrupted run (the loaders use no workers: a block is a slice of a memmap).
    loader_kwargs = {"generator": torch.Generator(), "pin_memory": run.device.type == "cuda"}
    train = EpochBatches(splits["train"], micro, run.seed, run.rank, run.world_size, loader_kwargs=loader_kwargs)
    accumulation = t.gradient_accumulation_steps
    n_val = min(len(splits["val"]), t.eval_iters * t.batch_size)
    val_loader = eval_loader(run, Subset(splits["val"], range(n_val)), max(1, t.batch_size // run.world_size),
                             loader_kwargs={"pin_memory": run.device.type == "cuda"})
    fit(
        run, model, train,
        loss_fn=loss_fn,
        evaluate=lambda model, step: evaluate(run, model, val_loader),
        total_steps=t.max_iters,
        eval_interval=t.eval_interval,
        steps_per_epoch=math.ceil(train.steps_per_epoch / accumulation),
        tokens_per_step=t.batch_size * block,
        flops_per_step=flops_per_token(model, block) * block * micro * accumulation,
        select=("val", "loss", "min"),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
