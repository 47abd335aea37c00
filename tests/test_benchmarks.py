"""benchmarks/optimizer_step.py on its smallest configuration: it runs every
candidate at 1 and 2 threads, each count in a process of its own, and writes its
table, raw numbers and figure."""
import json
import os
from pathlib import Path

import pytest

from benchmarks import optimizer_step
from optimizers import _native


def test_optimizer_step_benchmark_writes_its_report(tmp_path):
    enabled = _native.ENABLED
    assert optimizer_step.main(["--sizes", "1m", "--dtypes", "fp32", "--repeats", "1", "--no-first-step",
                                "--threads", "1,2", "--out", str(tmp_path)]) == 0
    assert _native.ENABLED == enabled  # the "compiled" candidates switched the native kernels back on
    results = json.loads((tmp_path / "cpu.json").read_text())
    timed = [r for r in results["rows"] if r["path"] != "default"]
    for threads in (1, 2):
        paths = {(r["optimizer"], r["path"]) for r in timed if r["threads"] == threads}
        for name in optimizer_step.OURS:
            assert {(name, p) for p in ("single", "foreach", "fused", "compiled")} <= paths
        assert {("Adam", "fused"), ("AdamW", "foreach"), ("SGD", "fused")} <= paths
    assert {r["threads"] for r in results["rows"]} == {1, 2}
    # Each thread count ran in a process of its own, not in this one.
    pids = {r["threads"]: r["pid"] for r in timed}
    assert {r["pid"] for r in timed} == set(pids.values()) and len(pids) == 2 and os.getpid() not in pids.values()
    for r in timed:
        assert "error" not in r, r
        assert r["step_ms"] > 0 and r["ratio"] > 0 and r["peak_extra_mb"] >= 0
    states = {r["optimizer"]: r["state_bytes_per_param"] for r in timed if r["path"] == "fused" and r["threads"] == 1}
    # Ours hold exactly what the math needs; torch's Adam adds a step counter per tensor.
    assert states == {"LDHD": 4.0, "CD": 4.0, "iKFAD": 8.0, "CADAM": 8.0,
                      "Adam": pytest.approx(8.0, rel=1e-3), "AdamW": pytest.approx(8.0, rel=1e-3), "SGD": 4.0}
    defaults = {r["optimizer"]: r["resolves_to"] for r in results["rows"] if r["path"] == "default"}
    expected = "fused" if _native.why_unavailable() is None else "single"
    assert defaults == {name: expected for name in optimizer_step.OURS}
    table = (tmp_path / "cpu.md").read_text()
    assert "## 1M: 1.1M parameters in 52 tensors, fp32, 1 thread" in table and f"**default = {expected}**" in table
    assert "## 1M: 1.1M parameters in 52 tensors, fp32, 2 threads" in table
    model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name"))
    assert results["machine"]["cpu"] == model and model in table
    assert (tmp_path / "cpu.png").read_bytes().startswith(b"\x89PNG")
    # Each table is one block of rows: a blank line inside one would end it and print the rest as text.
    sections = table.split("\n## ")
    for section in sections[1:]:
        rows = [line for line in section.split("\n\n") if line.startswith("|")]
        assert len(rows) == 1, section[:200]
