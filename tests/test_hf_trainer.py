"""The Hugging Face Trainer with our optimizers: optimizers/README.md's snippet,
run as written on a tiny randomly initialised GPT-2, under the Trainer's linear
schedule (its default) and cosine with warmup."""
import math
import re
from pathlib import Path

import accelerate  # noqa: F401  (the Trainer needs it; pinned in environments/test.txt)
import pytest
import torch

from optimizers import CADAM

README = Path(__file__).resolve().parents[1] / "optimizers" / "README.md"
STEPS = 8


def readme_trainer_snippet() -> str:
    text = README.read_text()
    section = text[text.index("### With the Hugging Face `Trainer`"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def expected_multiplier(schedule: str, step: int, warmup: int) -> float:
    """transformers' schedules, written out: the factor in force during step ``step`` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, STEPS - warmup)
    return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("schedule,warmup", [("linear", 0), ("cosine", 3)])
def test_readme_trainer_snippet_follows_the_trainers_schedule(schedule, warmup, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    applied = []  # (optimizer, the lr multiplier of each group) at every step
    real_step = CADAM.step

    def recording_step(self, *args, **kwargs):
        applied.append((self, [float(g["lr"]) for g in self.param_groups]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(CADAM, "step", recording_step)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=16))
    g = torch.Generator().manual_seed(0)
    train = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 40, (32, 16), generator=g)]
    kwargs = dict(lr_scheduler_type=schedule, warmup_steps=warmup) if schedule != "linear" else {}
    args = TrainingArguments(str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, **kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    namespace = dict(model=model, args=args, train=train)
    exec(compile(readme_trainer_snippet(), str(README), "exec"), namespace)

    optimizers = list(dict.fromkeys(opt for opt, _ in applied))
    assert len(optimizers) == 2 and len(applied) == 2 * STEPS  # the snippet's two Trainers
    expected = [expected_multiplier(schedule, step, warmup) for step in range(STEPS)]
    for opt in optimizers:
        lrs = [lrs for o, lrs in applied if o is opt]
        for step, group_lrs in enumerate(lrs):
            for lr in group_lrs:
                assert lr == pytest.approx(expected[step], abs=1e-12), (step, lrs)
    # The second Trainer built the optimizer from the snippet's class and keywords, on its own groups.
    built = optimizers[1]
    assert isinstance(built, CADAM) and built.param_groups[0]["h"] == 1.604e-4
    assert len(built.param_groups) == 2  # the Trainer's decay / no-decay groups
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
