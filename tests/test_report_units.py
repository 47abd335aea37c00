"""harness.report piece by piece on run folders written by hand (no training; milliseconds each,
the figures a little more): finding runs, counting them, the table's cells, the figures' curves,
the folders a report writes to."""
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from harness import outputs, report as rep
from harness.errors import UsageError
from harness.outputs import Kept

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (imported once: under mutmut, before the mutants fork)


def val(*losses, step=10, key="loss", split="val"):
    return [{"step": step * i, "split": split, key: v} for i, v in enumerate(losses)]


def write_run(path, records, status="completed", experiment="nano", optimizer="adam", seed=None, **summary):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if status is not None:
        s = {"status": status, "experiment": experiment, "optimizer": optimizer, **summary}
        if seed is not None:
            s["seed"] = seed
        (path / "summary.json").write_text(json.dumps(s))
    return path


def run(records, status="completed", seed=None, dir="runs/x", **summary):
    """A run as find_runs gives it."""
    s = {"status": status, **summary}
    if seed is not None:
        s["seed"] = seed
    return {"dir": Path(dir), "summary": s, "metrics": records}


# --------------------------------------------------------------------------- finding and counting runs

def test_label_is_the_registrys_else_the_name():
    assert [rep.label(n) for n in ("adam", "msgd", "cadam", "ikfad", "mine")] == ["Adam", "mSGD", "CADAM", "iKFAD", "mine"]
    assert rep.label("cadam0 (h=0.005, c=7e+05)") == "CADAM0 (h=0.005, c=7e+05)"  # a group of variants
    assert rep.label("mine (h=1)") == "mine (h=1)"


def test_variants_never_average_one_optimizers_runs_at_different_values():
    released = {"h": 0.005244, "c": 702400.0, "alpha": 0.01198, "eps": 1e-8}
    tuned = {"h": 0.006875, "c": 119800.0, "alpha": 0.5, "eps": 1e-8}  # eps the same: not in the names
    runs = [run([], seed=s, optimizer="cadam0", hyperparameters=hp) for hp in (released, tuned) for s in (1, 2)]
    runs += [run([], seed=1, optimizer="adam", hyperparameters={"lr": 1e-3}),
             run([], seed=2, optimizer="adam", hyperparameters={"lr": 1e-3}),
             run([], seed=1, optimizer="cd"), run([], seed=1, optimizer="cd", hyperparameters={"h": 0.5})]
    groups = rep.variants(runs)
    # only the values that differ name a group (4 significant digits); one set of values keeps the plain name
    assert groups == {"cadam0 (h=0.005244, c=7.024e+05, alpha=0.01198)": runs[0:2],
                      "cadam0 (h=0.006875, c=1.198e+05, alpha=0.5)": runs[2:4],
                      "adam": runs[4:6], "cd (h=default)": runs[6:7], "cd (h=0.5)": runs[7:8]}
    assert sorted(groups, key=rep.order) == ["adam", "cd (h=0.5)", "cd (h=default)",
                                             "cadam0 (h=0.005244, c=7.024e+05, alpha=0.01198)",
                                             "cadam0 (h=0.006875, c=1.198e+05, alpha=0.5)"]
    rows = [row.split(" | ")[:2] for row in rep.table(groups).splitlines()[2:7]]
    assert rows == [["| Adam", "2"], ["| CD (h=0.5)", "1"], ["| CD (h=default)", "1"],
                    ["| CADAM0 (h=0.005244, c=7.024e+05, alpha=0.01198)", "2"],
                    ["| CADAM0 (h=0.006875, c=1.198e+05, alpha=0.5)", "2"]]


def test_find_runs_reads_every_run_with_a_summary_or_a_config(tmp_path, capsys):
    write_run(tmp_path / "a", val(3.0), seed=1, steps=5)
    unfinished = write_run(tmp_path / "b", val(2.0), status=None)
    (unfinished / "config.yaml").write_text("experiment: owt\nseed: 4\noptimizer: {name: cd, h: 0.25}\n")
    bare = write_run(tmp_path / "c", [], status=None)
    (bare / "config.yaml").write_text("train: {}\n")  # no experiment, optimizer or seed
    empty = write_run(tmp_path / "d", [], status=None)
    (empty / "config.yaml").write_text("")  # an empty config: read as nothing
    broken = write_run(tmp_path / "e", val(1.0), status=None)
    (broken / "config.yaml").write_text("a: [\n")
    nameless = write_run(tmp_path / "f", [], status=None)
    (nameless / "config.yaml").write_text("optimizer: null\n")
    damaged = write_run(tmp_path / "g", val(3.0), seed=2)
    (damaged / "metrics.jsonl").write_text("not json\n" + json.dumps(val(3.0)[0]) + "\n")
    (tmp_path / "h").mkdir()  # not a run
    runs = rep.find_runs(tmp_path)
    assert [r["dir"] for r in runs] == [tmp_path / n for n in ("a", "b", "c", "d", "f", "g")]
    assert [r["summary"] for r in runs] == [
        {"status": "completed", "experiment": "nano", "optimizer": "adam", "seed": 1, "steps": 5},
        {"status": "no summary", "experiment": "owt", "optimizer": "cd", "seed": 4, "hyperparameters": {"h": 0.25}},
        {"status": "no summary", "experiment": "?", "optimizer": "?", "seed": None, "hyperparameters": {}},
        {"status": "no summary", "experiment": "?", "optimizer": "?", "seed": None, "hyperparameters": {}},
        {"status": "no summary", "experiment": "?", "optimizer": "?", "seed": None, "hyperparameters": {}},
        {"status": "damaged records", "experiment": "nano", "optimizer": "adam", "seed": 2}]
    assert [r["metrics"] for r in runs] == [val(3.0), val(2.0), [], [], [], []]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith(f"skipped {broken}: no summary, and {broken / 'config.yaml'} is not valid YAML: ")
    assert err[1] == f"warning: {damaged / 'metrics.jsonl'}: line 1 is not a JSON record" or \
        err[1].startswith(f"warning: {damaged / 'metrics.jsonl'}: line 1 ")
    assert rep.completed(runs) == runs[:1]


def test_status_counts_in_a_fixed_order_then_a_to_z():
    runs = [run([], s) for s in ("weird", "damaged records", "no summary", "interrupted", "diverged", "completed",
                                 "completed", "abandoned", "diverged")] + [{"dir": "x", "summary": {}, "metrics": []}]
    assert rep.status_counts(runs) == ("completed 2, diverged 2, interrupted 1, no summary 1, damaged records 1, "
                                       "? 1, abandoned 1, weird 1")
    assert rep.status_counts([]) == ""


def test_diverged_seeds_name_each_with_its_last_step():
    runs = [run(val(1.0, 2.0, 3.0), "diverged", seed=3, steps=1200),  # the summary's steps win
            run(val(1.0, 2.0), "diverged", seed=7),  # else the last record's step
            run(val(1.0, 2.0), "completed", seed=8),
            run([{"split": "val", "loss": 1.0}], "diverged", seed=0),  # seed 0 is a seed; no step: 0
            run([], "diverged", dir="runs/cd/lr0.1"),  # no seed: the folder's name; no records: no step
            run(val(1.0), "diverged", seed=None, steps=None, dir="runs/y")]
    assert rep.diverged_seeds(runs) == "seed 3 (step 1200), seed 7 (step 10), seed 0 (step 0), lr0.1, y"
    assert rep.diverged_seeds(runs[2:3]) == "–" and rep.diverged_seeds([]) == "–"


# --------------------------------------------------------------------------- numbers

def test_curves_align_the_runs_steps_with_nan_where_a_run_has_none():
    a = run(val(3.0, 2.0, 1.0) + val(9.0, step=5, split="train") + [{"step": 30, "split": "val", "acc": 0.5}])
    b = run([{"step": 10, "split": "val", "loss": 2.5}, {"step": 40, "split": "val", "loss": "nan"},
             {"step": 50, "split": "val", "loss": None}, {"step": 60, "split": "val", "loss": 7}])
    steps, values = rep._curves([a, b], "val", "loss")
    assert steps.tolist() == [0, 10, 20, 40, 50, 60]
    expected = np.array([[3.0, 2.0, 1.0, np.nan, np.nan, np.nan], [np.nan, 2.5, np.nan, np.nan, np.nan, 7.0]])
    np.testing.assert_array_equal(values, expected)
    steps, values = rep._curves([], "val", "loss")
    assert steps.tolist() == [] and values.size == 0


def test_mean_std_over_finite_values_with_the_sample_std():
    assert rep._mean_std([]) == "–" and rep._mean_std([None, float("nan"), float("inf")]) == "–"
    assert rep._mean_std([2.5, None]) == "2.5000"
    assert rep._mean_std([1.0, 2.0, float("nan"), 4.0]) == f"2.3333 ± {math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2):.4f}"
    assert rep._mean_std([1, 2]) == "1.5000 ± 0.7071"


def test_metric_is_the_best_or_the_last_finite_value():
    r = run(val(3.0, 1.0, 2.0, float("nan")) + [{"step": 50, "split": "val", "acc": 0.25},
                                                  {"step": 60, "split": "val", "acc": 0.75},
                                                  {"step": 70, "split": "val", "acc": 0.5}])
    assert rep._metric(r, "val", "loss", "min") == 1.0 and rep._metric(r, "val", "loss", "final") == 2.0
    assert rep._metric(r, "val", "acc", "max") == 0.75 and rep._metric(r, "val", "acc", "final") == 0.5
    assert rep._metric(r, "test", "loss", "min") is None and rep._metric(r, "test", "loss", "final") is None
    assert isinstance(rep._metric(run([{"step": 0, "split": "val", "loss": 2}]), "val", "loss", "min"), float)


def test_estimator_keys_put_the_runs_headline_first():
    recs = [{"step": 0, "split": "val", "loss": 1.0, "loss_fixed": 1.0, "loss_fresh": 1.1, "loss_zz": 2.0},
            {"step": 0, "split": "train", "loss": 1.0, "loss_train": 1.0}]
    by_opt = {"adam": [run(recs)], "cd": [run(recs, val_estimators=["fresh", "fixed"])]}
    assert rep.estimator_keys(by_opt) == ["loss_fresh", "loss_fixed", "loss_zz"]
    assert rep.estimator_keys({"adam": [run(recs)]}) == ["loss_fixed", "loss_fresh", "loss_zz"]
    assert rep.estimator_keys({"adam": [run(val(1.0))]}) == []


def test_table_of_two_optimizers_by_hand():
    # wall time: the completed runs' mean in whole seconds (10.0 and 20.9: 15.45 s)
    adam = [run(val(3.0, 2.0, 2.5), seed=1, wall_time_s=10.0), run(val(3.0, 1.0, 1.5), seed=2, wall_time_s=20.9),
            run(val(3.0, 0.1), "diverged", seed=3, steps=11)]
    cd = [run(val(4.0), "interrupted", seed=1, wall_time_s=5.0)]
    md = rep.table({"cd": cd, "adam": adam})  # rows in the registry's order
    # the registry's order, not a-z: LDHD before CD
    assert [row.split(" | ")[0] for row in rep.table({"cd": cd, "ldhd": cd, "adam": cd}).splitlines()[2:5]] == \
        ["| Adam", "| LDHD", "| CD"]
    assert md == ("| optimizer | runs | best val loss | final val loss | wall time (s) | status | diverged seeds |\n"
                  "|---|---|---|---|---|---|---|\n"
                  "| Adam | 3 | 1.5000 ± 0.7071 | 2.0000 ± 0.7071 | 15 | completed 2, diverged 1 | seed 3 (step 11) |\n"
                  "| CD | 1 | – | – | – | interrupted 1 | – |\n\n" + rep.AVERAGING_RULE)


def test_table_adds_accuracy_test_and_estimator_columns_where_the_records_have_them():
    recs = [{"step": 0, "split": "val", "loss": 2.0, "loss_fresh": 2.0, "loss_fixed": 2.2, "acc": 0.5},
            {"step": 10, "split": "val", "loss": 1.0, "loss_fresh": 1.0, "loss_fixed": 1.2, "acc": 0.75},
            {"step": 10, "split": "test", "loss": 1.5, "acc": 0.7},
            {"step": 10, "split": "test_at_best_val", "acc": 0.65},
            {"step": 10, "split": None}]
    md = rep.table({"adam": [run(recs, val_estimators=["fresh", "fixed"], wall_time_s="?")]})
    head, rule, row = md.split("\n\n")[0].splitlines()
    assert head == ("| optimizer | runs | best val loss (fresh) | best val loss (fixed) | final val loss (fresh) | "
                    "final val loss (fixed) | best val acc | final val acc | final test loss | final test acc | "
                    "test acc of the best-val weights | wall time (s) | status | diverged seeds |")
    assert rule == "|" + "---|" * 14
    assert row == ("| Adam | 1 | 1.0000 | 1.2000 | 1.0000 | 1.2000 | 0.7500 | 0.7500 | 1.5000 | 0.7000 | 0.6500 | – | "
                   "completed 1 | – |")
    # a test split without accuracy: the test loss alone; no test_at_best_val: no column for it
    md = rep.table({"adam": [run(val(1.0) + val(2.0, split="test"), wall_time_s=3)]})
    assert md.splitlines()[0] == ("| optimizer | runs | best val loss | final val loss | final test loss | "
                                  "wall time (s) | status | diverged seeds |")
    assert md.splitlines()[2] == "| Adam | 1 | 1.0000 | 1.0000 | 2.0000 | 3 | completed 1 | – |"


# --------------------------------------------------------------------------- figures

@pytest.fixture
def figures(monkeypatch):
    """The figures plot would save, kept open: path -> figure."""
    saved = {}

    def save_figure(fig, path, **kwargs):
        saved[Path(path)] = (fig, kwargs)
        return Path(path)

    monkeypatch.setattr(outputs, "save_figure", save_figure)
    yield saved
    plt.close("all")


@pytest.fixture
def plots(monkeypatch):
    """report's calls of plot, each (optimizers, split, key, file name, title), no figure drawn:
    a figure is "drawn" when a run of the optimizers given has a ``split`` record with ``key``."""
    calls = []

    def plot(by_opt, split, key, path, title):
        calls.append((sorted(by_opt), split, key, Path(path).name, title))
        return any(r.get("split") == split and key in r for runs in by_opt.values() for run in runs
                   for r in run["metrics"])

    monkeypatch.setattr(rep, "plot", plot)
    return calls


def test_plot_draws_the_mean_and_a_std_band_per_optimizer(tmp_path, figures):
    by_opt = {"cadam": [run(val(4.0, 2.0, 1.0)), run(val(4.0, 4.0, 3.0))], "msgd": [run(val(5.0, 3.0))],
              "cd": [run(val(float("nan")))]}  # nothing finite to draw for cd
    assert rep.plot(by_opt, "val", "loss", tmp_path / "val_loss.png", "nano: val loss") is True
    fig, kwargs = figures[tmp_path / "val_loss.png"]
    assert kwargs == {"dpi": 120}
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["mSGD", "CADAM (n=2)"]  # the registry's order, not a-z; n for several seeds
    np.testing.assert_array_equal(lines["CADAM (n=2)"].get_xdata(), [0, 10, 20])
    np.testing.assert_array_equal(lines["CADAM (n=2)"].get_ydata(), [4.0, 3.0, 2.0])
    np.testing.assert_array_equal(lines["mSGD"].get_ydata(), [5.0, 3.0])
    [band] = ax.collections  # +-1 (population) std around CADAM's mean: 0, 1, 1
    edge = {(float(x), float(y)) for x, y in band.get_paths()[0].vertices}
    assert {(0, 4.0), (10, 2.0), (20, 1.0), (10, 4.0), (20, 3.0)} <= edge
    # in its curve's colour, and translucent: the curves under it stay visible
    assert tuple(band.get_facecolor()[0][:3]) == matplotlib.colors.to_rgb(lines["CADAM (n=2)"].get_color())
    assert 0 < band.get_alpha() < 1
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("iteration", "val loss", "nano: val loss")
    # the loss axis: up to the 90th percentile of every value, a little below the lowest
    finite = np.array([4.0, 2.0, 1.0, 4.0, 4.0, 3.0, 5.0, 3.0])
    top = np.percentile(finite, 90)
    assert ax.get_ylim() == pytest.approx((1.0 - 0.05 * (top - 1.0), top))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mSGD", "CADAM (n=2)"]


def test_plot_of_another_metric_keeps_matplotlibs_limits_and_draws_nothing_without_values(tmp_path, figures):
    by_opt = {"adam": [run(val(0.5, 0.9, key="acc"))]}
    assert rep.plot(by_opt, "val", "acc", tmp_path / "val_acc.png", "t")
    ax = figures[tmp_path / "val_acc.png"][0].axes[0]
    assert ax.get_ylim()[0] < 0.5 and ax.get_ylim()[1] > 0.9 and ax.get_ylabel() == "val acc"
    assert not ax.collections  # one seed: no band
    assert rep.plot(by_opt, "val", "loss", tmp_path / "val_loss.png", "t") is False
    assert rep.plot({"adam": [run(val(float("nan"), "nan"))]}, "val", "loss", tmp_path / "x.png", "t") is False
    assert rep.plot({}, "val", "loss", tmp_path / "y.png", "t") is False
    assert set(figures) == {tmp_path / "val_acc.png"}
    # a loss curve that is NaN at some steps: the limits come from the finite values only
    assert rep.plot({"adam": [run(val(2.0, float("nan"), 1.0))]}, "val", "loss", tmp_path / "z.png", "t")
    assert figures[tmp_path / "z.png"][0].axes[0].get_ylim() == pytest.approx((1.0 - 0.05 * 0.9, 1.9))


def test_plot_draws_a_curve_of_one_evaluation_and_one_through_an_infinite_loss_quietly(tmp_path, figures):
    import warnings

    assert rep.plot({"adam": [run(val(2.0))]}, "val", "loss", tmp_path / "one.png", "t")
    [line] = figures[tmp_path / "one.png"][0].axes[0].get_lines()
    assert line.get_xydata().tolist() == [[0.0, 2.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's invalid-value warnings for inf - inf are kept quiet
        assert rep.plot({"adam": [run(val(2.0, float("inf"))), run(val(3.0, 1.0))]}, "val", "loss",
                        tmp_path / "inf.png", "t")


def test_plot_writes_a_png(tmp_path):
    assert rep.plot({"adam": [run(val(2.0, 1.0))]}, "val", "loss", tmp_path / "val_loss.png", "t")
    assert (tmp_path / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the report's files

def test_copy_records_copies_the_small_files_of_finished_runs(tmp_path):
    runs = tmp_path / "runs"
    a = write_run(runs / "adam" / "seed1", val(1.0))
    (a / "config.yaml").write_text("seed: 1\n")
    (a / "checkpoint.pt").write_bytes(b"weights")
    write_run(runs / "cd" / "seed1", val(2.0))
    going = write_run(runs / "cd" / "seed2", val(2.0), status=None)
    (going / "config.yaml").write_text("seed: 2\n")
    written = rep.copy_records(runs, tmp_path / "out")
    copied = tmp_path / "out" / "runs"
    assert sorted(written) == sorted([copied / "adam/seed1/config.yaml", copied / "adam/seed1/metrics.jsonl",
                                      copied / "adam/seed1/summary.json", copied / "cd/seed1/metrics.jsonl",
                                      copied / "cd/seed1/summary.json"])
    assert all(p.read_bytes() == (runs / p.relative_to(copied)).read_bytes() for p in written)


def test_runs_basis_names_completed_runs_by_their_path_under_the_root(tmp_path):
    root = tmp_path / "runs"
    inside = run(val(1.0), dir=root / "adam" / "seed1")
    outside = run(val(1.0), dir=tmp_path / "elsewhere")
    failed = run(val(1.0), "diverged", dir=root / "cd")
    assert rep.runs_basis(root, [inside, outside, failed]) == outputs.basis(
        [("adam/seed1", inside["summary"]), (str(tmp_path / "elsewhere"), outside["summary"])])


def test_report_writes_one_folder_per_experiment_and_refuses_an_empty_root(tmp_path, monkeypatch, plots):
    with pytest.raises(UsageError) as err:
        rep.report(tmp_path / "nothing")
    assert str(err.value) == f"no run directories (with config.yaml or summary.json) under {tmp_path / 'nothing'}"
    runs = tmp_path / "runs"
    write_run(runs / "a", val(2.0, 1.0), experiment="nano", seed=1)
    write_run(runs / "b", val(3.0, 2.0) + val(0.5, key="acc"), experiment="vit", optimizer="cd", seed=1)
    (runs / "c").mkdir()
    (runs / "c" / "summary.json").write_text(json.dumps({"status": "completed"}))  # no experiment, no optimizer
    monkeypatch.chdir(tmp_path)
    written = rep.report(runs)  # default: results/<experiment>
    assert sorted(p.as_posix() for p in written) == [
        "results/?/results.md", "results/nano/results.md", "results/nano/val_loss.png", "results/vit/results.md",
        "results/vit/val_acc.png", "results/vit/val_loss.png"]
    assert "| ? | 1 | – | – | – | completed 1 | – |" in (tmp_path / "results/?/results.md").read_text()
    written = rep.report(runs, tmp_path / "out", with_records=True)  # several experiments: a folder each
    assert tmp_path / "out" / "vit" / "results.md" in written and tmp_path / "out" / "runs" / "b" / "summary.json" in written
    # the records go to results/<the first experiment> when no --out is given
    monkeypatch.chdir(tmp_path / "out")
    rep.report(runs / "a", with_records=True)
    assert (tmp_path / "out" / "results" / "nano" / "runs" / "metrics.jsonl").is_file()
    # one experiment: straight into --out
    written = rep.report(runs / "a", tmp_path / "one")
    assert sorted(p.name for p in written) == ["results.md", "val_loss.png"] and written[0].parent == tmp_path / "one"


def test_report_text_names_the_root_the_estimators_and_the_figures(tmp_path, plots):
    runs = tmp_path / "runs"
    recs = [{"step": 0, "split": "val", "loss": 2.0, "loss_fresh": 2.0, "loss_fixed": 2.5, "loss_odd": 3.0},
            {"step": 10, "split": "val", "loss": 1.0, "loss_fresh": 1.0, "loss_fixed": 1.5, "loss_odd": 3.0},
            {"step": 10, "split": "train", "loss": 1.2}]
    write_run(runs / "a", recs, seed=1, val_estimators=["fresh", "fixed"])
    write_run(runs / "b", recs, status="diverged", optimizer="cd", seed=1)  # no completed cd run: in no figure
    written = rep.report(runs, tmp_path / "out", title="My title")
    out = tmp_path / "out"
    assert [p.name for p in written] == ["val_loss.png", "val_loss_fixed.png", "val_loss_odd.png", "train_loss.png",
                                        "results.md"]
    assert plots == [(["adam"], "val", key, f"val_{key}.png", f"My title: val {key}")
                     for key in ("loss", "loss_fixed", "loss_odd", "acc")] + [
        (["adam"], "test", "acc", "test_acc.png", "My title: test acc"),
        (["adam"], "train", "loss", "train_loss.png", "My title: train loss")]
    text = (out / "results.md").read_text()
    found = rep.find_runs(runs)
    by_opt = {"adam": found[:1], "cd": found[1:]}
    assert text == "\n".join([
        "# My title", "",
        f"Runs under `{runs}`. Means ± std over seeds and the curves use completed runs only; `status` counts "
        "every run (diverged, interrupted, or with no summary: still going or killed before it wrote one).", "",
        "Validation loss estimators: fresh: fresh random validation batches at every evaluation (nanoGPT's "
        "estimator, the paper's); fixed: the same validation batches at every evaluation; odd: odd. "
        "`val_loss.png` shows the first (fresh).", "",
        rep.table(by_opt), "",
        "![val_loss](val_loss.png)", "![val_loss_fixed](val_loss_fixed.png)", "![val_loss_odd](val_loss_odd.png)",
        "![train_loss](train_loss.png)"]) + "\n\n" + rep.runs_basis(runs, found).line() + "\n"
    # without a title, the experiment's name
    plots.clear()
    rep.report(runs, tmp_path / "plain")
    assert (tmp_path / "plain" / "results.md").read_text().startswith("# nano\n\nRuns under")
    assert plots[0][4] == "nano: val loss"


def test_report_draws_completed_runs_only(tmp_path, figures):
    runs = tmp_path / "runs"
    write_run(runs / "a", val(2.0, 1.0), seed=1)
    write_run(runs / "b", val(9.0, 9.0), status="diverged", seed=2)
    write_run(runs / "c", val(9.0), status="diverged", optimizer="cd", seed=1)  # no completed cd run: no curve
    rep.report(runs, tmp_path / "out", title="T")
    ax = figures[tmp_path / "out" / "val_loss.png"][0].axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["Adam"] and ax.get_title() == "T: val loss"
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), [2.0, 1.0])
    # the same optimizer at other values: a curve and a row of its own, not a second seed
    write_run(runs / "d", val(4.0, 3.0), seed=1, hyperparameters={"lr": 0.5})
    rep.report(runs, tmp_path / "variants", title="T")
    ax = figures[tmp_path / "variants" / "val_loss.png"][0].axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["Adam (lr=0.5)", "Adam (lr=default)"]
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), [4.0, 3.0])
    assert "| Adam (lr=0.5) | 1 | 3.0000 |" in (tmp_path / "variants" / "results.md").read_text()


def test_report_keeps_a_fuller_report_unless_forced_and_checks_every_folder_first(tmp_path, plots):
    runs = tmp_path / "runs"
    write_run(runs / "a", val(2.0, 1.0), seed=1)
    write_run(runs / "b", val(2.0, 1.5), seed=2)
    rep.report(runs, tmp_path / "out")
    (runs / "b" / "summary.json").unlink()
    (runs / "b" / "config.yaml").write_text("experiment: nano\n")  # b no longer completed: fewer runs
    before = (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(Kept, match="was built from 2 runs and this one from 1 run: kept it"):
        rep.report(runs, tmp_path / "out")
    assert (tmp_path / "out" / "results.md").read_text() == before
    rep.report(runs, tmp_path / "out", force=True)
    assert "built from 1 run;" in (tmp_path / "out" / "results.md").read_text()
    # two experiments, the second's folder holds a figure from elsewhere: nothing is written to either
    write_run(runs / "v", val(1.0), experiment="vit", seed=1)
    (tmp_path / "two" / "vit").mkdir(parents=True)
    (tmp_path / "two" / "vit" / "train_loss.png").write_bytes(b"mine")
    with pytest.raises(Kept, match="records no basis"):
        rep.report(runs, tmp_path / "two")
    assert not (tmp_path / "two" / "nano").exists()
