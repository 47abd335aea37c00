"""Train nanoGPT's character-level GPT with one optimizer: the paper's nano experiment.

    python -m nano.train --optimizer cadam --seed 1337 [--config FILE] [--set key=value ...] [--out DIR]
    torchrun --nproc_per_node 4 -m nano.train --optimizer cadam --seed 1337

The protocol is ``nano/configs/paper.yaml`` and the optimizer's hyperparameters
default to ``nano/configs/best.yaml``. The run directory (default
``runs/nano/<optimizer>/seed<S>``) gets ``config.yaml``, ``metrics.jsonl``,
``summary.json`` and ``checkpoint.pt``; re-running the command resumes it.
owt (``python -m owt.train``) is this same script with owt's configs.
"""
from __future__ import annotations

import nano
from harness.data import LMEvaluation, RandomTokenBatches
from harness.errors import command
from harness.loop import fit
from harness.run import start
from harness.token_bins import TokenBins, TokenData, expect_paper_data
from nano.model import GPT, GPTConfig

GPT2_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT
# Keys added after runs were started, at the value that does what those runs did (see
# harness.config.BEHAVIOUR_OF_OLDER_RUNS).
BEHAVIOUR_OF_OLDER_RUNS = {"model.scaled_init": "all", "data.check_source": True}


def check_config(cfg: dict) -> None:
    """The model section, by nano's model config (``GPTConfig``): a one-line UsageError for a
    value no model can use (called by ``harness.config.resolve``)."""
    GPTConfig(**cfg["model"])


@command
def main(argv=None, experiment: str = "nano", data: TokenData = nano.DATA) -> int:
    """Train nano's GPT on the token bins of ``experiment``, as its ``data`` says (``nano.DATA``, ``owt.DATA``)."""
    run = start(experiment, argv)
    if run is None:
        return 0
    m, t = run.cfg["model"], run.train
    bins = TokenBins(run.cfg["data"]["dir"], data)
    expect_paper_data(bins, run)
    micro = run.micro_batch_size()
    evaluate = LMEvaluation(run, bins, t.batch_size, m["block_size"], t.eval_iters, t.eval_batches)
    vocab_size = m.get("vocab_size") or bins.vocab_size or GPT2_VOCAB
    model = GPT(GPTConfig(**{**m, "vocab_size": vocab_size}))
    run.print(f"{experiment}: GPT with {model.get_num_params() / 1e6:.2f}M parameters, vocab {vocab_size}, "
              f"optimizer {run.cfg['optimizer']}, device {run.device} ({run.precision})")

    # train.batch_size is the global batch: each of K ranks takes batch / (K x accumulation)
    # sequences per forward pass, so the paper's 16 sequences per update hold on any GPU count.
    accumulation, block = t.gradient_accumulation_steps, m["block_size"]
    fit(
        run, model,
        RandomTokenBatches(bins, micro, block, run.seed, run.rank),
        loss_fn=lambda model, xy: (model(*xy)[1], {}),
        evaluate=evaluate,
        total_steps=t.max_iters,
        eval_interval=t.eval_interval,
        tokens_per_step=t.batch_size * block,
        flops_per_step=model.estimate_flops_per_iter(micro * accumulation),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
