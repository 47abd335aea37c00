"""Train nanoGPT's GPT on OpenWebText with one optimizer: the paper's owt experiment.

    python -m owt.train --optimizer cadam --seed 1337 [--config FILE] [--set key=value ...] [--out DIR]
    torchrun --nproc_per_node 8 -m owt.train --optimizer cadam --seed 1337

This is nano's training script (``nano/train.py``: nano's GPT, nanoGPT's random
windows from ``train.bin``, ``harness.fit``) with owt's configs: the protocol is
``owt/configs/paper.yaml`` (6 layers, 8 heads, width 512, block 1024, vocab
50304, batch 16, 50,001 iterations, fp16 autocast + GradScaler on CUDA, clipping
at 1.0) and the optimizer's hyperparameters default to ``owt/configs/best.yaml``.
The data is ``python -m owt.prepare`` (GPT-2 BPE token bins in ``data/owt``).

``train.batch_size`` is the global batch, unlike nanoGPT's (per process): an
optimizer step sees ``batch_size`` sequences of ``block_size`` tokens whatever the
number of processes, each process feeding ``batch_size / (world_size x
gradient_accumulation_steps)`` of them at a time (``Run.micro_batch_size``; a
one-line error unless that divides evenly). The paper's 16 are 16 per forward on
one GPU, 2 per GPU on 8; ``gradient_accumulation_steps`` only splits them further
(for memory), never changes the batch. The run directory (default
``runs/owt/<optimizer>/seed<S>``) gets ``config.yaml``, ``metrics.jsonl``,
``summary.json`` and ``checkpoint.pt``; re-running the command resumes it.
"""
from __future__ import annotations

import owt
from nano.train import BEHAVIOUR_OF_OLDER_RUNS, check_config  # noqa: F401 (owt's configs: nano's model)
from nano.train import main as nano_main


def main(argv=None) -> int:
    return nano_main(argv, experiment="owt", data=owt.DATA)


if __name__ == "__main__":
    raise SystemExit(main())
