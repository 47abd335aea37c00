"""A study's result for the configs: the best trial's hyperparameters in ``best.yaml`` format,
to a new file (``export --out``) or in place in ``<exp>/configs/best.yaml`` (``--write-best``)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from ..checkpoint import write_text_atomic
from ..errors import UsageError
from ..experiments import Experiment
from .space import set_arg


def best_params(study) -> dict[str, float]:
    """The best completed trial's hyperparameters; a one-line UsageError if none completed."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UsageError(f"study {study.study_name} has no completed trial yet")
    return dict(study.best_trial.params)


def yaml_float(value: float) -> str:
    """A float YAML 1.1 reads back as a float (``1e-05`` would be a string; ``1.0e-05`` is not)."""
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def flow_entry(params: dict) -> str:
    """``{h: 0.25, c: 3.0}``: one YAML flow mapping of floats."""
    return "{" + ", ".join(f"{k}: {yaml_float(v)}" for k, v in params.items()) + "}"


def export_best(study, exp: Experiment, optimizer: str, out: Path, force: bool = False) -> Path:
    """Write ``{optimizer: {hp: value}}`` (best.yaml format) to a new file ``out``."""
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} exists; choose a new --out or pass --force to overwrite it")
    best = study.best_trial
    out.parent.mkdir(parents=True, exist_ok=True)
    rule = best.user_attrs.get("objective", "best")  # trials from before the key: the best val loss
    params = best_params(study)
    use = f"--config {out}"
    if best.user_attrs.get("config"):  # tuned on that config's model and data: for runs with it
        use = " ".join([f"--config {best.user_attrs['config']}",
                        *(f"--set {set_arg(f'optimizer.{k}', v)}" for k, v in params.items())])
    # Atomic: a kill mid-write (also of an --force overwrite) leaves the old file or the new one.
    write_text_atomic(out, f"# Best of study {study.study_name}: trial {best.number}, {rule} val loss "
                           f"{best.value:.6g}, run {best.user_attrs.get('run_dir', '?')}.\n"
                           f"# Use with: python -m {' '.join([exp.module, *exp.args])} --optimizer {optimizer} "
                           f"{use}\n"
                           f"{optimizer}: {flow_entry(params)}\n")
    return out


def write_best(best_yaml: Path, optimizer: str, params: dict) -> None:
    """Replace (or append) the ``optimizer:`` entry of a best.yaml, keeping every other line and comment."""
    from ..config import as_number

    best_yaml = Path(best_yaml)
    text = best_yaml.read_text() if best_yaml.exists() else ""
    before = yaml.safe_load(text) or {}
    merged = {**(before.get(optimizer) or {}), **params}
    lines = text.splitlines(keepends=True)
    pattern = re.compile(rf"^{re.escape(optimizer)}[ \t]*:[ \t]*")  # not \s: a block entry's key ends its line
    for i, line in enumerate(lines):
        match = pattern.match(line)
        if match:
            end = i + 1  # a block-style entry continues on indented lines
            while end < len(lines) and lines[end][:1] in (" ", "\t") and lines[end].strip():
                end += 1
            lines[i:end] = [f"{match.group(0).rstrip()} {flow_entry(merged)}\n"]
            break
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(f"{optimizer}: {flow_entry(merged)}\n")
    new = "".join(lines)
    after = yaml.safe_load(new)
    expected = {**before, optimizer: merged}
    if {k: {h: as_number(v) for h, v in (e or {}).items()} for k, e in after.items()} != \
            {k: {h: as_number(v) for h, v in (e or {}).items()} for k, e in expected.items()}:
        raise UsageError(f"could not edit {best_yaml} in place; write the entry by hand: {optimizer}: {flow_entry(merged)}")
    write_text_atomic(best_yaml, new)
