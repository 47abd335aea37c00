"""The fused (compiled) step against the single-tensor reference (issue 8).

Compiling costs seconds, so every test here uses tiny tensors and the kernels
are shared: one per (optimizer, dtype), compiled by whichever test needs it first.
"""
import copy
import os
import shutil
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from optimizers import CADAM, CD, LDHD, _fused, build, iKFAD
from optimizers._base import FUSED_DEFAULT_MIN_NUMEL

OURS = [LDHD, CD, iKFAD, CADAM]
# Inductor compiles CPU kernels with a C++ compiler; without one the fused path
# falls back to the eager loop (tested below) and the kernel tests cannot run.
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler for torch.compile on the CPU"
)
# A hyperparameter change mid-run, per optimizer: every coefficient moves.
CHANGES = {
    LDHD: dict(gamma=0.9),
    CD: dict(gamma=0.9, c=3.0),
    iKFAD: dict(alpha=2.0, mu=0.5),
    CADAM: dict(c=3.0, alpha=2.0, eps=1e-6),
}


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def run_groups(cls, fused, dtype, steps=20):
    """20 steps on four param groups with hyperparameters changed at step 10.

    Small tensors go through the fused path in concatenated batches (group 1
    needs two), a (200, 200) one through its own kernel call; a large transposed parameter
    (its layout is not flat) and a group holding only a one-element parameter
    take the eager update inside the fused path; one parameter never gets a
    gradient.
    """
    g = torch.Generator().manual_seed(1)
    shapes = [(7, 3), (5,), (2, 3, 4), (1,), (6,), (200, 200), (150, 200), (150, 200), (150, 200), (300,)]
    params = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    params.append(torch.randn(4, 3, generator=g, dtype=dtype).t())
    params.append(torch.randn(180, 200, generator=g, dtype=dtype).t())
    params.append(torch.randn(1, generator=g, dtype=dtype))
    params = [p.requires_grad_() for p in params]
    frozen = params[4]
    trained = [p for p in params if p is not frozen]
    groups = [
        {"params": params[:2], "h": 0.1},
        {"params": params[2:9], "h": 0.05, "gamma": 0.3, "weight_decay": 0.1},  # two batches
        {"params": params[9:12], "h": 0.02},
        {"params": params[12:], "h": 0.1},
    ]
    opt = cls(groups, fused=fused)
    for step in range(steps):
        if step == 10:
            opt.param_groups[0]["h"] = 0.07
            opt.param_groups[1]["weight_decay"] = 0.0
            opt.param_groups[2].update(CHANGES[cls])
        opt.zero_grad()
        loss = sum((p**2).sum() * (i + 1) + p.sin().sum() for i, p in enumerate(trained))
        loss.backward()
        opt.step()
    assert frozen not in opt.state
    return params, opt


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_fused_matches_single_tensor(cls, dtype):
    ref, opt_ref = run_groups(cls, False, dtype)
    out, opt_out = run_groups(cls, True, dtype)
    assert (cls._update, "cpu", dtype) in _fused._ready  # the compiled kernel ran
    for p, q in zip(out, ref):
        assert p.dtype == q.dtype and p.stride() == q.stride()
        states = [(opt_out.state[p][n], opt_ref.state[q][n]) for n in cls.state_names] if q in opt_ref.state else []
        if dtype == torch.float64:
            for a, b in [(p, q), *states]:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        else:
            # Inductor contracts multiply-adds into FMAs, so single roundings
            # differ from the eager ops' and the 20 steps amplify them: parameters
            # agree to 1e-6 relative, a momentum near a sign change to 1e-6 absolute.
            assert relative_error(p, q) <= 1e-6
            for a, b in [(p, q), *states]:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_fused_step_bumps_the_autograd_version():
    q = torch.randn(8, requires_grad=True)
    opt = CD([q], fused=True)
    q.grad = torch.ones(8)
    before = q._version
    opt.step()
    assert q._version > before


@needs_compiler
def test_hyperparameter_changes_do_not_recompile():
    opts, params = [], []
    for cls in OURS:
        p = torch.randn(50, dtype=torch.float64, requires_grad=True)
        p.grad = torch.randn(50, dtype=torch.float64)
        opts.append(cls([p], fused=True))
        params.append(p)
    for opt in opts:
        opt.step()  # compiles (or reuses) the float64 kernels
    compiled = graphs_compiled()
    for cls, opt, p in zip(OURS, opts, params):
        group = opt.param_groups[0]
        # A scheduler at work, and weight decay switched on from exactly 0.
        for h in (0.01, 0.02, 0.5):
            group.update({**CHANGES[cls], "h": h, "gamma": 3 * h, "weight_decay": 0.1 if h > 0.01 else 0.0})
            before = p.detach().clone()
            opt.step()
            assert not torch.equal(before, p.detach())
    assert graphs_compiled() == compiled


@needs_compiler
@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_bf16_fused_update_is_float32_math_rounded_once(cls):
    """One step from a non-zero state: the fused bf16 result is the float32
    update rounded to bf16 (to one bf16 unit), and closer to it than the eager
    bf16 loop, which rounds after every sub-step."""
    g = torch.Generator().manual_seed(3)
    n = 4096
    q0, g0 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    states0 = [torch.randn(n, generator=g).abs() * 0.3 for _ in cls.state_names]
    bf = lambda t: t.to(torch.bfloat16)

    def one_step(fused, dtype):
        q = q0.to(dtype).clone().requires_grad_()
        q.grad = g0.to(dtype).clone()
        opt = cls([q], h=0.3, fused=fused, **CHANGES[cls])
        opt.step()  # creates zero state; overwrite it and step again from a known state
        for name, s in zip(cls.state_names, states0):
            opt.state[q][name].copy_(s.to(dtype))
        with torch.no_grad():
            q.copy_(q0.to(dtype))
        opt.step()
        return q.detach()

    # The float32 reference starts from the bf16-rounded inputs, as the bf16 runs do.
    q0, g0, states0 = bf(q0).float(), bf(g0).float(), [bf(s).float() for s in states0]
    reference = one_step(False, torch.float32)
    fused = one_step(True, torch.bfloat16).float()
    eager = one_step(False, torch.bfloat16).float()
    ulp = torch.finfo(torch.bfloat16).eps * reference.abs().clamp_min(1e-30)
    assert ((fused - reference).abs() <= ulp).all()
    assert (fused - reference).norm() < (eager - reference).norm()


@needs_compiler
def test_fused_step_inside_compiled_model():
    torch.manual_seed(0)
    eager_net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    net = copy.deepcopy(eager_net)
    model = torch.compile(net)
    opt = CADAM(net.parameters(), h=0.05, fused=True)
    opt_ref = CADAM(eager_net.parameters(), h=0.05, fused=False)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    for _ in range(5):
        for m, o in ((model, opt), (eager_net, opt_ref)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(net.parameters(), eager_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_fused_step_under_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        ref_net = copy.deepcopy(net)
        ddp = DistributedDataParallel(net)
        opt = iKFAD(ddp.parameters(), h=0.1, fused=True)
        opt_ref = iKFAD(ref_net.parameters(), h=0.1, fused=True)
        x, y = torch.randn(32, 6), torch.randn(32, 1)
        for _ in range(5):
            for m, o in ((ddp, opt), (ref_net, opt_ref)):
                o.zero_grad()
                torch.nn.functional.mse_loss(m(x), y).backward()
                o.step()
        for a, b in zip(net.parameters(), ref_net.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_default_path_depends_on_model_size():
    small = [torch.zeros(10, requires_grad=True)]
    big = [torch.zeros(FUSED_DEFAULT_MIN_NUMEL // 2, requires_grad=True) for _ in range(2)]
    opt = CD(small)
    assert not opt._use_fused(opt.param_groups[0])
    opt = CD(big)
    assert opt._use_fused(opt.param_groups[0])
    # An explicit choice wins over the size rule.
    for opt, fused in ((CD(big, foreach=False), False), (CD(big, fused=False), False), (CD(small, fused=True), True)):
        assert opt._use_fused(opt.param_groups[0]) is fused
    assert build("cadam0", small, fused=True).param_groups[0]["fused"] is True


def test_bad_fused_flags_raise():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="Invalid fused: 'yes'; expected None, True or False"):
        CADAM(p, fused="yes")
    with pytest.raises(ValueError, match="foreach=True with fused=True"):
        LDHD(p, foreach=True, fused=True)


@pytest.mark.parametrize("failure", ["compile error", "no compiler"])
def test_falls_back_with_one_warning_when_compilation_fails(monkeypatch, failure):
    """Where compiling is impossible, fused=True warns once and runs the eager loop."""

    def broken(update):
        def kernel(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return kernel

    monkeypatch.setattr(_fused, "_ready", set())
    monkeypatch.setattr(_fused, "_unavailable", {})
    if failure == "compile error":
        monkeypatch.setattr(_fused, "compiled_update", broken)
    else:
        monkeypatch.setattr(_fused, "_why_unavailable", lambda device: "no C++ compiler")

    def train(fused):
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2).double()
        opt = CD(net.parameters(), h=0.1, c=5.0, fused=fused)
        for _ in range(3):
            opt.zero_grad()
            net(torch.ones(4, 3, dtype=torch.float64)).pow(2).sum().backward()
            opt.step()
        return [p.detach() for p in net.parameters()]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = train(True)
        train(True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "falling back to the single-tensor loop" in messages[0], messages
    assert ("no C++ compiler" if failure == "no compiler" else "InvalidCxxCompiler") in messages[0]
    for a, b in zip(fused, train(False)):
        assert torch.equal(a, b)


@needs_compiler
def test_fused_optimizer_inside_a_compiled_training_step():
    """A training step compiled as a whole, optimizer step included (dynamo's
    eager backend: traced, no code generated), gives the reference numbers."""
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3).double()
    ref_net = copy.deepcopy(net)
    opt = CD(net.parameters(), h=0.1, c=2.0, fused=True)
    opt_ref = CD(ref_net.parameters(), h=0.1, c=2.0, fused=False)
    x = torch.randn(8, 5, dtype=torch.float64)

    def train_step(model, optimizer):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()

    compiled_step = torch.compile(train_step, backend="eager")
    for _ in range(3):
        compiled_step(net, opt)
        train_step(ref_net, opt_ref)
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
