"""scripts/preflight.sh: the quick preflight on the CPU end to end (what CI runs), and the
GPU-only arithmetic and report plumbing with hand-made numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import preflight

ROOT = Path(__file__).resolve().parents[1]
GPU_ONLY = ("nano packing", "owt throughput", "ddp")


def test_quick_preflight_passes_on_the_cpu_and_skips_the_gpu_checks(tmp_path):
    results = ROOT / "results" / "preflight"
    before = sorted(results.iterdir()) if results.is_dir() else []
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    done = subprocess.run(["bash", "scripts/preflight.sh", "--quick", "--out", str(tmp_path / "report")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (js,) = (tmp_path / "report").glob("*-cpu-quick.json")  # beside a full report, never over it
    assert js.with_suffix(".md").is_file()
    report = json.loads(js.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    expected = [f"train {e}" for e in ("nano", "owt", "gpt2", "vit", "cifar", "bert/sst2", "bert/qnli")]
    expected += [f"step {o}" for o in ("CD", "iKFAD", "CADAM", "LDHD")] + list(GPU_ONLY)
    assert list(checks) == expected
    for name in expected[:-3]:
        assert checks[name]["status"] == "ok", (name, checks[name]["reason"])
    for name in GPU_ONLY:
        assert checks[name]["status"] == "skipped" and checks[name]["reason"] == "no CUDA device (GPU only)"
        assert f"[skipped] {name}" in done.stdout  # printed with its reason
    for name in expected[:7]:  # CPU: fp32 (cpu_precision), resumed records bit for bit
        numbers = checks[name]["numbers"]
        assert numbers["precision"] == "fp32" and numbers["device"] == "cpu" and numbers["resume"] == "exact"
        assert numbers["resumed_at_step"] == numbers["steps"] // 2 >= 3  # interrupted, resumed, records equal
    assert report["verdict"].startswith("READY") and report["device"] == "cpu" and report["quick"]
    assert report["versions"]["torch"]
    assert (sorted(results.iterdir()) if results.is_dir() else []) == before  # nothing written into results/
    # a second preflight keeps the report there (harness.outputs' rule) unless --force, before checking anything
    kept = js.read_bytes()
    again = subprocess.run(["bash", "scripts/preflight.sh", "--quick", "--out", str(tmp_path / "report")], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--force" in again.stderr and "[ok]" not in again.stdout
    assert js.read_bytes() == kept


def test_records_differ_exact_and_within_tolerance():
    a = [{"split": "val", "step": 0, "loss": 1.0}, {"split": "train", "step": 1, "loss": float("nan")}]
    assert preflight.records_differ(a, [dict(r) for r in a]) is None
    b = [dict(a[0], loss=1.0 + 1e-9), a[1]]
    assert "loss 1.0 against 1.000000001" in preflight.records_differ(a, b)
    assert preflight.records_differ(a, b, rtol=1e-6) is None
    assert preflight.records_differ(a, a[:1]) == "2 records against 1"
    assert "split 'val' against 'test'" in preflight.records_differ(a, [dict(a[0], split="test"), a[1]])


def test_protocol_prediction_and_recommendation_by_hand():
    # 80 runs at 4 per GPU on 2 GPUs: 10 waves, each 30 s for 300 iterations -> 5001 iterations
    # take 30 * 5001 / 300 = 500.1 s, plus 10 s of start-up: 10 * 510.1 s.
    assert preflight.predicted_protocol_s(30.0, 10.0, 300, 4, 2) == pytest.approx(5101.0)
    # 80 runs, 16 per GPU, 1 GPU: 5 waves
    assert preflight.predicted_protocol_s(60.0, 0.0, 300, 16, 1) == pytest.approx(5 * 1000.2)
    rows = [{"runs_per_gpu": 1, "predicted_protocol_s": 1000.0}, {"runs_per_gpu": 2, "predicted_protocol_s": 520.0},
            {"runs_per_gpu": 4, "predicted_protocol_s": 500.0}, {"runs_per_gpu": 8, "predicted_protocol_s": 490.0},
            {"runs_per_gpu": 16}]  # 16 failed (no prediction)
    assert preflight.recommend(rows) == 4  # 500 is within 5% of the best 490; 520 is not
    assert preflight.recommend([{"runs_per_gpu": 1}]) is None


def _fake_launch(run_s: dict, monkeypatch):
    """harness.launch.main replaced by one that writes each run's summary.json: the run of
    N-packed runs takes ``run_s[N]`` seconds of training."""
    from harness import launch

    def main(argv):
        runs_dir = Path(argv[argv.index("--runs-dir") + 1])
        n = int(argv[argv.index("--runs-per-gpu") + 1])
        assert argv[argv.index("--gpus") + 1] == "3"
        for seed in argv[argv.index("--seeds") + 1: argv.index("--gpus")]:
            out = runs_dir / "adam" / f"seed{seed}"
            out.mkdir(parents=True)
            (out / "summary.json").write_text(json.dumps({"status": "completed", "wall_time_s": run_s[n]}))
        return 0

    monkeypatch.setattr(launch, "main", main)
    monkeypatch.setattr(launch, "visible_gpus", lambda: ["3"])  # CUDA_VISIBLE_DEVICES=3: GPU "3" is the first
    # the wall time of each launch: training plus 5 s of start-up
    clock = iter([t for n in preflight.PACKING for t in (0.0, run_s[n] + 5.0)])
    monkeypatch.setattr(preflight, "clock", lambda: next(clock))


def test_nano_packing_on_a_simulated_gpu(tmp_path, monkeypatch):
    """The GPU-only packing check with harness.launch and the clock simulated: N runs at once
    take 10, 10, 12, 30, 70 s for N = 1, 2, 4, 8, 16 (300 iterations each)."""
    run_s = {1: 10.0, 2: 10.0, 4: 12.0, 8: 30.0, 16: 70.0}
    _fake_launch(run_s, monkeypatch)
    ctx = preflight.Context(device=None, gpus=1, quick=False, scratch=tmp_path, log=lambda _: None)
    monkeypatch.setattr(ctx, "smoke_sets", lambda spec: ["data.dir=/nowhere"])
    numbers = preflight.nano_packing_check(ctx)
    # predicted: ceil(80 / N) waves x (run_s * 5001 / 300 + 5): N=4 gives 20 x 205.04 = 4100.8 s,
    # N=2 40 x 171.7 = 6868 s, N=8 10 x 505.1 = 5051 s, N=16 5 x 1171.9 = 5859.5 s
    predicted = {r["runs_per_gpu"]: r["predicted_protocol_s"] for r in numbers["rows"]}
    assert predicted[4] == pytest.approx(20 * (12.0 * 5001 / 300 + 5.0), abs=1)
    assert predicted[16] == pytest.approx(5 * (70.0 * 5001 / 300 + 5.0), abs=1)
    assert numbers["recommended_runs_per_gpu"] == 4
    assert numbers["predicted_protocol_h"] == pytest.approx(4100.8 / 3600, abs=0.01)
    assert [r["iters_per_s"] for r in numbers["rows"]] == [round(n * 300 / (run_s[n] + 5), 1) for n in run_s]


def _report(folder: Path, host: str, n, status="ok", date="2026-12-01T00:00:00"):
    checks = [{"name": "nano packing", "status": status, "numbers": {"recommended_runs_per_gpu": n}}]
    (folder / f"{host}-{date[:10]}.json").write_text(json.dumps({"host": host, "date": date, "checks": checks}))


def test_recommended_runs_per_gpu_reads_this_hosts_report(tmp_path):
    assert preflight.recommended_runs_per_gpu("nano", tmp_path, "node1") is None
    _report(tmp_path, "node2", 8)
    _report(tmp_path, "node1", 2, status="failed")
    assert preflight.recommended_runs_per_gpu("nano", tmp_path, "node1") is None
    _report(tmp_path, "node1", 4, date="2026-12-02T00:00:00")
    _report(tmp_path, "node1", 6, date="2026-12-03T00:00:00")
    (tmp_path / "broken.json").write_text("{not json")
    assert preflight.recommended_runs_per_gpu("nano", tmp_path, "node1") == 6  # the newest
    assert preflight.recommended_runs_per_gpu("cifar", tmp_path, "node1") is None  # measured for nano only


def test_reproduce_takes_runs_per_gpu_from_the_report(tmp_path):
    import platform

    env = dict(os.environ, PREFLIGHT_DIR=str(tmp_path), PYTHON=sys.executable)
    cmd = ["bash", "scripts/reproduce.sh", "nano", "--seeds", "1337", "--optimizers", "adam", "--list"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "bash scripts/preflight.sh" in done.stderr  # says how to measure it
    _report(tmp_path, platform.node(), 4)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--runs-per-gpu 4" in done.stderr, done.stderr
    done = subprocess.run(cmd + ["--runs-per-gpu", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--runs-per-gpu 4" not in done.stderr  # the user's choice stands


def test_owt_throughput_on_simulated_gpus(tmp_path, monkeypatch):
    """The GPU-only owt check with harness.launch simulated on 2 GPUs: the steady state is
    taken between the 10th and the last logged step, compile and evaluation excluded."""
    from harness import launch, smoke_data

    def main(argv):
        assert argv[argv.index("--seeds") + 1: argv.index("--runs-per-gpu")] == ["0", "1"]  # one run per GPU
        out = Path(argv[argv.index("--runs-dir") + 1]) / "adam" / "seed0"
        out.mkdir(parents=True)
        (out / "config.yaml").write_text("train: {batch_size: 16}\nmodel: {block_size: 1024}\n")
        # 40 steps in 4 s after step 10 (10 steps/s); the whole run averaged 5 steps/s, MFU 0.2
        rows = [{"split": "val", "step": 0, "loss": 11.0, "time_s": 1.0}]
        rows += [{"split": "train", "step": s, "loss": 5.0, "time_s": 1.0 + 0.1 * s} for s in (5, 10, 20, 30, 40, 50)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "summary.json").write_text(json.dumps({"precision": "fp16", "steps_per_s": 5.0, "mfu": 0.2}))
        return 0

    monkeypatch.setattr(launch, "main", main)
    monkeypatch.setattr(launch, "visible_gpus", lambda: ["0", "1"])
    monkeypatch.setattr(smoke_data, "owt_bins", lambda root, **kw: Path(root))
    ctx = preflight.Context(device=None, gpus=2, quick=False, scratch=tmp_path, log=lambda _: None)
    numbers = preflight.owt_throughput_check(ctx)
    assert numbers["steps_per_s"] == 10.0 and numbers["precision"] == "fp16"
    assert numbers["tokens_per_s"] == 10 * 16 * 1024 and numbers["tokens_per_s_per_gpu"] == 5 * 16 * 1024
    assert numbers["mfu"] == pytest.approx(0.4)
    with pytest.raises(preflight.Skip, match="needs 2 GPUs, this node has 1"):
        preflight.ddp_check(preflight.Context(device=None, gpus=1, quick=False, scratch=tmp_path))


def test_a_check_fails_or_skips_alone_with_a_one_line_reason(monkeypatch):
    real = preflight.importlib.util.find_spec
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None if name == "timm" else real(name))
    ran = []
    skipped = preflight.run_check("train vit", lambda: ran.append(1), preflight.NEEDS["vit"])
    assert (skipped.status, skipped.reason) == ("skipped", "needs the optional package(s) timm, not installed")
    assert not ran  # the check itself never started
    assert preflight.run_check("train cifar", lambda: {"a": 1}, preflight.NEEDS["cifar"]).numbers == {"a": 1}

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nmore detail\nthe last line")

    failed = preflight.run_check("x", broken)
    assert (failed.status, failed.reason) == ("failed", "RuntimeError: the last line")
    assert preflight.run_check("y", lambda: preflight.sys.exit(2)).status == "failed"  # argparse's exit too
    checks = [skipped, failed, preflight.Check("z")]
    assert preflight.verdict(checks) == "NOT READY: 1 check(s) failed (x)"
    assert preflight.verdict([skipped, preflight.Check("z")]) == "READY: every applicable check passed (1 skipped)"
