"""A study's figures and summary: ``history.png``, ``importances.png`` and ``study.md``."""
from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import write_text_atomic
from .space import OBJECTIVES


def plot_study(study, out_dir: Path) -> list[Path]:
    """``history.png`` (optimisation history), ``importances.png`` (fANOVA parameter importances,
    when the study allows: at least two completed trials) and ``study.md`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written = []
    plots = [("history.png", ovm.plot_optimization_history, 1), ("importances.png", ovm.plot_param_importances, 2)]
    for name, draw, needed in plots:
        if len(complete) < needed:
            print(f"{study.study_name}: {name} needs {needed} completed trial(s), has {len(complete)}; skipped")
            continue
        try:
            ax = draw(study)
        except Exception as e:  # e.g. importances of a study whose trials all share one value
            print(f"{study.study_name}: {name} skipped ({type(e).__name__}: {e})")
            plt.close("all")
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        tmp = out_dir / f".{name}.tmp{os.getpid()}.png"
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    md = out_dir / "study.md"
    write_text_atomic(md, study_markdown(study, [p.name for p in written]))
    return written + [md]


def study_markdown(study, figures: list[str], top: int = 10) -> str:
    """``study.md``: trial counts by state, the ``top`` completed trials, links to ``figures``."""
    from optuna.trial import TrialState

    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
                        TrialState.WAITING)}
    lines = [f"# Study {study.study_name}", "",
             "Trials: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + ".", ""]
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    if complete:
        names = list(complete[0].params)
        rule = complete[0].user_attrs.get("objective", "best")  # trials before the key: the best val loss
        lines += [f"Best {min(top, len(complete))} trials (objective: {OBJECTIVES.get(rule, rule)}):", "",
                  "| trial | objective | " + " | ".join(names) + " | run |",
                  "|---|---|" + "---|" * len(names) + "---|"]
        for t in complete[:top]:
            lines.append(f"| {t.number} | {t.value:.4f} | " + " | ".join(f"{t.params.get(n, float('nan')):.4g}"
                                                                         for n in names)
                         + f" | {Path(t.user_attrs.get('run_dir', '?')).name} |")
        lines.append("")
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
