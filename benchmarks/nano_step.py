"""Where a nano training step's time goes on one CPU core, and what makes it cheaper.

    python benchmarks/nano_step.py [--data data/nano] [--steps 200] [--threads 1] [--out benchmarks/results]

The paper's nano protocol (nano/configs/paper.yaml: GPT 4 x 4 x 128, block 64,
batch 16, grad clipping 1.0, one optimizer step per batch; 51 evaluations of 2 x
100 batches, fresh and fixed) timed piece by piece on ``--threads`` threads:
drawing a batch, forward, backward, clipping, the optimizer step (Adam and the
paper's optimizers at their tuned values) and one evaluation. The achieved model
FLOP/s (nanoGPT's count, ``GPT.estimate_flops_per_iter``) is set against this
core's measured fp32 matmul throughput (``harness.cpu.matmul_peak_flops``), the
CPU analogue of a GPU's MFU. Then the same step with the candidate speed-ups
(``torch.compile`` of the model, including its compile time; evaluation batched
several batches per forward pass; bf16 autocast, ``train.cpu_precision: bf16``, which
changes the numbers by rounding), with the number each gives for a full run.
Writes ``nano_cpu.md`` and ``nano_cpu.json`` to ``--out``; results there from as many
measurements or more are kept unless ``--force`` is given (``harness.outputs``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nano  # noqa: E402
import optimizers  # noqa: E402
from harness import outputs  # noqa: E402
from harness.config import resolve  # noqa: E402
from harness.errors import command  # noqa: E402
from harness.cpu import matmul_peak_flops  # noqa: E402
from harness.token_bins import TokenBins  # noqa: E402
from nano.model import GPT, GPTConfig  # noqa: E402

PIECES = ("data", "forward", "backward", "clip", "optimizer")


def build(cfg: dict, vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**cfg["model"], "vocab_size": vocab}))


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def median(values):
    return sorted(values)[len(values) // 2]


def time_steps(model, opt, bins, steps: int, batch: int, block: int, gen, autocast=contextlib.nullcontext) -> dict:
    """Seconds per step of each piece (median over ``steps`` after 10 warm-up steps)."""
    times = {k: [] for k in PIECES}
    for i in range(steps + 10):
        t0 = time.perf_counter()
        x, y = bins.get_batch("train", batch, block, gen)
        t1 = time.perf_counter()
        with autocast():
            _, loss = model(x, y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if i >= 10:
            for k, a, b in zip(PIECES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
                times[k].append(b - a)
    return {k: median(v) for k, v in times.items()}


def time_eval(model, bins, batch: int, block: int, iters: int, per_forward: int, repeats: int = 3,
              autocast=contextlib.nullcontext) -> float:
    """Seconds for one estimator's evaluation (``iters`` batches, ``per_forward`` per forward pass)."""
    best = float("inf")
    gen = torch.Generator().manual_seed(1)
    model.eval()
    with torch.no_grad(), autocast():
        for _ in range(repeats):
            t0 = time.perf_counter()
            chunk = []
            for k in range(iters):
                chunk.append(bins.get_batch("val", batch, block, gen))
                if len(chunk) == per_forward or k == iters - 1:
                    x, y = (torch.cat(t) for t in zip(*chunk))
                    model(x, y)
                    chunk = []
            best = min(best, time.perf_counter() - t0)
    model.train()
    return best


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/nano", help="a prepared nano folder (python -m nano.prepare ...)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--optimizers", nargs="+", default=["adam", "cd", "ikfad", "cadam"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement (~1 min)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16-autocast measurement")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--force", action="store_true", help="replace results there from as many measurements or more")
    args = p.parse_args(argv)
    md = args.out / "nano_cpu.md"  # one measurement per optimizer, the compiled model and bf16
    basis = outputs.Basis(len(args.optimizers) + (not args.no_compile) + (not args.no_bf16))
    outputs.check(md, basis, args.force, [md.with_suffix(".json")])
    torch.set_num_threads(args.threads)

    bins = TokenBins(args.data, nano.DATA)
    base = resolve("nano", "adam", 1337)
    t, block = base["train"], base["model"]["block_size"]
    batch, iters, total = t["batch_size"], t["eval_iters"], t["max_iters"]
    evals = total // t["eval_interval"] + 1
    estimators = len(t.get("eval_batches", ["fixed"]))
    peak = matmul_peak_flops()
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                           "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
                           "matmul_peak_flops": peak},
               "steps": {}, "eval": {}, "full_run_s": {}}

    model = build(base, bins.vocab_size or 65)
    flops = model.estimate_flops_per_iter(batch)
    for name in args.optimizers:
        cfg = resolve("nano", name, 1337)
        model = build(cfg, bins.vocab_size or 65)
        hp = {k: v for k, v in cfg["optimizer"].items() if k != "name"}
        opt = optimizers.build(name, model.parameters(), **hp)
        pieces = time_steps(model, opt, bins, args.steps, batch, block, torch.Generator().manual_seed(0))
        step = sum(pieces.values())
        results["steps"][name] = {**pieces, "step": step, "tokens_per_s": batch * block / step,
                                  "flops_per_s": flops / step, "utilization": flops / step / peak}
        print(f"{name:7s} step {1e3 * step:6.1f} ms: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in pieces.items())
              + f"; {flops / step / 1e9:.1f} GFLOP/s = {100 * flops / step / peak:.0f}% of the matmul peak", flush=True)

    model = build(base, bins.vocab_size or 65)
    for per_forward in (1, 2, 4, 8):
        results["eval"][per_forward] = time_eval(model, bins, batch, block, iters, per_forward)
        print(f"evaluation of {iters} batches, {per_forward} per forward: {results['eval'][per_forward]:.2f} s",
              flush=True)

    if not args.no_compile:
        model = build(base, bins.vocab_size or 65)
        opt = optimizers.build("adam", model.parameters(), lr=1e-3)
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        x, y = bins.get_batch("train", batch, block, torch.Generator().manual_seed(0))
        compiled(x, y)[1].backward()
        opt.zero_grad()
        compile_s = time.perf_counter() - t0
        pieces = time_steps(compiled, opt, bins, args.steps, batch, block, torch.Generator().manual_seed(0))
        results["compiled"] = {**pieces, "step": sum(pieces.values()), "compile_s": compile_s}
        print(f"compiled model: step {1e3 * sum(pieces.values()):.1f} ms after {compile_s:.0f} s of compiling",
              flush=True)

    if not args.no_bf16:
        # fp32 and bf16 in alternating rounds, so that the machine's drift (a shared VM's speed moves by
        # 10-30% over minutes) falls on both alike: the ratio is the measurement.
        rounds, timed = 5, {}
        for key, ctx in (("fp32", contextlib.nullcontext), ("bf16", bf16)):
            model = build(base, bins.vocab_size or 65)
            timed[key] = (model, optimizers.build("adam", model.parameters(), lr=1e-3), ctx, [], [])
        for r in range(rounds):
            for model, opt, ctx, steps_, evals_ in timed.values():
                steps_.append(sum(time_steps(model, opt, bins, max(args.steps // rounds, 10), batch, block,
                                             torch.Generator().manual_seed(r), ctx).values()))
                evals_.append(time_eval(model, bins, batch, block, iters, 1, repeats=1, autocast=ctx))
        (*_, step32, eval32), (*_, step16, eval16) = timed["fp32"], timed["bf16"]
        step_ratio = median([b / a for a, b in zip(step32, step16)])
        eval_ratio = median([b / a for a, b in zip(eval32, eval16)])
        results["bf16"] = {"rounds": rounds, "step_fp32": step32, "step_bf16": step16,
                           "eval_fp32": eval32, "eval_bf16": eval16,
                           "step_ratio": step_ratio, "eval_ratio": eval_ratio}
        print(f"bf16 autocast against fp32, {rounds} alternating rounds: step x{step_ratio:.2f}, "
              f"evaluation x{eval_ratio:.2f}", flush=True)

    adam = results["steps"]["adam"]["step"] if "adam" in results["steps"] else None
    best_eval = min(results["eval"], key=results["eval"].get)
    for name, r in results["steps"].items():
        results["full_run_s"][name] = {
            "as_configured": total * r["step"] + evals * estimators * results["eval"][2],
            "eval_one_batch_per_forward": total * r["step"] + evals * estimators * results["eval"][1],
        }
    if "bf16" in results and adam:
        results["full_run_s"]["adam_bf16"] = (total * adam * results["bf16"]["step_ratio"]
                                              + evals * estimators * results["eval"][1] * results["bf16"]["eval_ratio"])
    if "compiled" in results and adam:
        results["full_run_s"]["adam_compiled"] = (results["compiled"]["compile_s"] + total * (
            results["compiled"]["step"]) + evals * estimators * results["eval"][best_eval])

    outputs.write_text(md.with_suffix(".json"), json.dumps(results, indent=1))
    m = results["machine"]
    lines = [f"# nano on the CPU: {m['cpu']}, {m['threads']} thread(s), torch {m['torch']} ({m['capability']})", "",
             f"Measured fp32 matmul peak on these threads: {peak / 1e9:.1f} GFLOP/s. "
             f"Model FLOPs per step (nanoGPT's count): {flops / 1e9:.3f} GFLOP.", "",
             "| optimizer | step (ms) | data | forward | backward | clip | optimizer | tokens/s | GFLOP/s | of peak | full run (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["steps"].items():
        lines.append(f"| {name} | {1e3 * r['step']:.1f} | " + " | ".join(f"{1e3 * r[k]:.1f}" for k in PIECES)
                     + f" | {r['tokens_per_s']:.0f} | {r['flops_per_s'] / 1e9:.1f} | {100 * r['utilization']:.0f}% | "
                     f"{results['full_run_s'][name]['as_configured'] / 60:.1f} |")
    lines += ["", f"One evaluation ({iters} batches of {batch} x {block}; a run has {evals} x {estimators}): "
              + ", ".join(f"{k} per forward {v:.2f} s" for k, v in results["eval"].items()) + "."]
    if "compiled" in results:
        c = results["compiled"]
        lines += ["", f"`torch.compile` of the model (Adam): step {1e3 * c['step']:.1f} ms "
                  f"(eager {1e3 * adam:.1f} ms), after {c['compile_s']:.0f} s of compiling; a full run "
                  f"{results['full_run_s']['adam_compiled'] / 60:.1f} min against "
                  f"{results['full_run_s']['adam']['as_configured'] / 60:.1f} min eager."]
    if "bf16" in results and adam:
        b = results["bf16"]
        lines += ["", f"bf16 autocast (`train.cpu_precision: bf16`; Adam), timed against fp32 in {b['rounds']} "
                  f"alternating rounds: step x{b['step_ratio']:.2f} (bf16 {1e3 * min(b['step_bf16']):.1f}-"
                  f"{1e3 * max(b['step_bf16']):.1f} ms, fp32 {1e3 * min(b['step_fp32']):.1f}-"
                  f"{1e3 * max(b['step_fp32']):.1f} ms), one evaluation x{b['eval_ratio']:.2f}; applied to the "
                  f"fp32 numbers above, a full run {results['full_run_s']['adam_bf16'] / 60:.1f} min against "
                  f"{results['full_run_s']['adam']['eval_one_batch_per_forward'] / 60:.1f} min in fp32. It changes "
                  "the numbers by bf16 rounding (not the paper's fp16): see results/nano/README.md for what that "
                  "does to a full run."]
    outputs.write_text(md, outputs.stamp("\n".join(lines), basis))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
