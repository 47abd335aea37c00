"""The fused step against the single-tensor reference (issue 8).

Both implementations of the fused path are tested on the CPU (the
``fused_backend`` fixture, tests/conftest.py): the native C kernels and
``torch.compile`` of ``_update``, which is the CUDA path. Compiling costs
seconds, so every test here uses tiny tensors and the compiled kernels are
shared: one per (optimizer, dtype), compiled by whichever test needs it first.
"""
import copy
import ctypes
import inspect
import os
import shutil
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from conftest import FUSED_PATH_MUTATED, compiles_update

from optimizers import CADAM, CD, LDHD, _fused, _native, build, iKFAD
from optimizers._base import FUSED_DEFAULT_MIN_NUMEL

OURS = [LDHD, CD, iKFAD, CADAM]
# Inductor compiles CPU kernels with a C++ compiler; the native kernels need a C one.
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler for torch.compile on the CPU"
)
needs_native = pytest.mark.skipif(_native.why_unavailable() is not None,
                                  reason=f"native kernels unavailable: {_native.why_unavailable()}")
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

    The compiled kernel updates small tensors in concatenated batches (group 1
    needs two) and a (200, 200) one through its own call; the native kernels
    take every tensor of a group in one call, transposed ones too. A parameter
    whose elements are not contiguous in memory (a column slice) takes the
    eager update inside either; so does, for the compiled kernel, a transposed
    parameter and a group holding only a one-element parameter. One parameter
    never gets a gradient.
    """
    g = torch.Generator().manual_seed(1)
    shapes = [(7, 3), (5,), (2, 3, 4), (1,), (6,), (200, 200), (150, 200), (150, 200), (150, 200), (300,)]
    params = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    params.append(torch.randn(4, 3, generator=g, dtype=dtype).t())
    params.append(torch.randn(180, 200, generator=g, dtype=dtype).t())
    params.append(torch.randn(1, generator=g, dtype=dtype))
    params.append(torch.randn(30, 8, generator=g, dtype=dtype)[:, :5])
    params = [p.requires_grad_() for p in params]
    frozen = params[4]
    trained = [p for p in params if p is not frozen]
    groups = [
        {"params": params[:2], "h": 0.1},
        {"params": params[2:9], "h": 0.05, "gamma": 0.3, "weight_decay": 0.1},  # two batches
        {"params": params[9:12] + params[13:], "h": 0.02},
        {"params": params[12:13], "h": 0.1},
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
    assert not params[13].is_contiguous() and params[13].grad.stride() != params[13].stride()
    return params, opt


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_fused_matches_single_tensor(cls, dtype, fused_backend):
    ref, opt_ref = run_groups(cls, False, dtype)
    out, opt_out = run_groups(cls, True, dtype)
    assert fused_backend.ran(cls, dtype)
    for p, q in zip(out, ref):
        assert p.dtype == q.dtype and p.stride() == q.stride()
        states = [(opt_out.state[p][n], opt_ref.state[q][n]) for n in cls.state_names] if q in opt_ref.state else []
        if dtype == torch.float64:
            for a, b in [(p, q), *states]:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        else:
            # Both kernels contract multiply-adds into FMAs and the native one
            # has its own exp2, so single roundings differ from the eager ops'
            # and the 20 steps amplify them: elements agree to 1e-5 relative or,
            # near a sign change, 1e-6 absolute; the parameters as a whole to 1e-6.
            for a, b in [(p, q), *states]:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:
        flat = lambda params: torch.cat([p.detach().flatten() for p in params])
        assert relative_error(flat(out), flat(ref)) <= 1e-6


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_native_result_does_not_depend_on_the_thread_count(cls, dtype):
    """The elements of all tensors are split into one contiguous range per
    thread, cutting tensors anywhere: every element is updated exactly once, and
    the same way, whatever the number of threads."""
    shapes = [(40_000,), (3,), (70_001,), (123, 457), (1,), (9_999,)]  # 3 threads: cuts inside tensors

    def run(threads):
        g = torch.Generator().manual_seed(5)
        params = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]
        opt = cls(params, h=0.1, fused=True)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
                opt.step()
        finally:
            torch.set_num_threads(before)
        return params, opt

    one, opt_one = run(1)
    three, opt_three = run(3)
    for p, q in zip(one, three):
        assert torch.equal(p, q)
        for name in cls.state_names:
            assert torch.equal(opt_one.state[p][name], opt_three.state[q][name])
        assert (opt_one.state[p]["momentum"] != 0).all()  # no element was skipped


def test_fused_step_bumps_the_autograd_version(fused_backend):
    q = torch.randn(8, requires_grad=True)
    opt = CD([q], fused=True)
    q.grad = torch.ones(8)
    before = q._version
    opt.step()
    assert fused_backend.ran(CD, torch.float32)
    assert q._version > before


def test_hyperparameter_changes_do_not_recompile(fused_backend, monkeypatch):
    """A scheduler's changes, and weight decay switched on from exactly 0, are
    data: no graph is compiled again and the native library is not rebuilt."""
    builds = []
    monkeypatch.setattr(_native, "_build", lambda *args: builds.append(args))
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
        for h in (0.01, 0.02, 0.5):
            group.update({**CHANGES[cls], "h": h, "gamma": 3 * h, "weight_decay": 0.1 if h > 0.01 else 0.0})
            before = p.detach().clone()
            opt.step()
            assert not torch.equal(before, p.detach())
        assert fused_backend.ran(cls, torch.float64)
    assert graphs_compiled() == compiled and not builds


def test_native_library_is_built_once_per_machine(tmp_path, monkeypatch):
    """The first use builds the library into the cache folder; a later process
    (here: the module's state reset) loads that file without compiling."""
    if _native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("NONLINEAR_DAMPING_CACHE", str(tmp_path / "cache"))
    builds = []
    real_build = _native._build
    monkeypatch.setattr(_native, "_build", lambda *args: builds.append(args) or real_build(*args))
    for _ in range(2):
        monkeypatch.setattr(_native, "_library", None)
        monkeypatch.setattr(_native, "_failure", None)
        monkeypatch.setattr(_native, "_functions", {})
        assert _native.why_unavailable() is None
        assert _native.supports("cadam", torch.device("cpu"), torch.float32)
    assert len(builds) == 1
    built = list((tmp_path / "cache").iterdir())
    assert [f.suffix for f in built] == [".so"]  # the library, no leftover temporary file
    assert isinstance(_native.library(), ctypes.CDLL)


def test_subclass_that_overrides_update_does_not_inherit_the_native_kernel():
    class Faster(CD):
        pass

    class Different(CD):
        @staticmethod
        def _update(q, g, p, k):
            CD._update(q, g, p, k)
            p.mul_(0.5)

    assert (CD.native_kernel, Faster.native_kernel, Different.native_kernel) == ("cd", "cd", None)


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_fused_step_propagates_nan_and_inf_like_the_eager_loop(cls, fused_backend):
    """A non-finite gradient poisons the same elements on every path (so that
    training reports divergence rather than carrying on)."""

    def run(fused):
        q = torch.linspace(-1, 1, 64, requires_grad=True)
        opt = cls([q], h=0.1, fused=fused)
        grad = torch.linspace(-2, 2, 64)
        grad[[3, 17]] = float("nan")
        grad[[5, 40]] = float("inf")
        grad[41] = -float("inf")
        for _ in range(2):
            q.grad = grad.clone()
            opt.step()
        return q.detach(), [opt.state[q][n] for n in cls.state_names]

    (q_eager, s_eager), (q_fused, s_fused) = run(False), run(True)
    assert fused_backend.ran(cls, torch.float32)
    for a, b in [(q_fused, q_eager), *zip(s_fused, s_eager)]:
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_low_precision_fused_update_is_float32_math_rounded_once(cls, low, fused_backend):
    """One step from a non-zero state: the fused bf16 (fp16) result is the
    float32 update rounded to bf16 (fp16), to one unit of that format, and
    closer to it than the eager loop, which rounds after every sub-step."""
    g = torch.Generator().manual_seed(3)
    n = 4096
    q0, g0 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    states0 = [torch.randn(n, generator=g).abs() * 0.3 for _ in cls.state_names]
    rounded = lambda t: t.to(low).float()

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

    # The float32 reference starts from the rounded inputs, as the low-precision runs do.
    q0, g0, states0 = rounded(q0), rounded(g0), [rounded(s) for s in states0]
    reference = one_step(False, torch.float32)
    fused = one_step(True, low).float()
    assert fused_backend.ran(cls, low)
    eager = one_step(False, low).float()
    ulp = torch.finfo(low).eps * reference.abs().clamp_min(1e-30)
    assert ((fused - reference).abs() <= ulp).all()
    assert (fused - reference).norm() < (eager - reference).norm()


@needs_compiler
def test_fused_step_inside_compiled_model(fused_backend):
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
    assert fused_backend.ran(CADAM, torch.float32)
    for a, b in zip(net.parameters(), eager_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_step_under_ddp(tmp_path, fused_backend):
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
        assert fused_backend.ran(iKFAD, torch.float32)
        for a, b in zip(net.parameters(), ref_net.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


@compiles_update
def test_default_path(monkeypatch):
    """On a CPU with the native kernels, fused=None takes them at any size;
    without them (and on CUDA) the compiled kernel only from 4M elements on."""
    small = [torch.zeros(10, requires_grad=True)]
    big = [torch.zeros(FUSED_DEFAULT_MIN_NUMEL // 2, requires_grad=True) for _ in range(2)]
    native = _native.why_unavailable() is None
    for params in (small, big):
        expected = "native" if native else ("compiled" if params is big else "single")
        assert CD(params).code_path() == expected
    monkeypatch.setattr(_native, "ENABLED", False)
    assert CD(small).code_path() == "single"
    assert CD(big).code_path() == "compiled"
    # An explicit choice wins over the size rule.
    for opt, path in ((CD(big, foreach=False), "single"), (CD(big, fused=False), "single"),
                      (CD(big, foreach=True), "foreach"), (CD(small, fused=True), "compiled")):
        assert opt.code_path() == path
    assert build("cadam0", small, fused=True).param_groups[0]["fused"] is True


def test_bad_fused_flags_raise():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="Invalid fused: 'yes'; expected None, True or False"):
        CADAM(p, fused="yes")
    with pytest.raises(ValueError, match="foreach=True with fused=True"):
        LDHD(p, foreach=True, fused=True)


def _fresh_backends(monkeypatch):
    """This process, as if the fused path had made no backend and given no warning yet."""
    monkeypatch.setattr(_fused, "_backends", {})
    monkeypatch.setattr(_fused, "_warned", set())


def _break_native(monkeypatch):
    """This process, as on a machine without a C compiler."""
    monkeypatch.setattr(_native, "_compiler", lambda: None)
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_failure", None)
    monkeypatch.setattr(_native, "_functions", {})
    _fresh_backends(monkeypatch)


def _train_cd(fused):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    opt = CD(net.parameters(), h=0.1, c=5.0, fused=fused)
    for _ in range(3):
        opt.zero_grad()
        net(torch.ones(4, 3, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
    return [p.detach() for p in net.parameters()]


def _train_cd_fused_twice():
    """Two fused runs: the first one's parameters, and the RuntimeWarnings of both,
    each checked to point at ``_train_cd``'s ``opt.step()``: the user's line, not the
    optimizer's or torch's wrappers of ``step``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = _train_cd(True)
        _train_cd(True)
    caught = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    step_line = next(i for i, line in enumerate(inspect.getsourcelines(_train_cd)[0]) if "opt.step()" in line)
    for w in caught:
        where = (w.filename, w.lineno)
        assert FUSED_PATH_MUTATED or where == (__file__, _train_cd.__code__.co_firstlineno + step_line)
    return fused, [str(w.message) for w in caught]


@pytest.mark.parametrize("failure", ["compile error", "no compiler"])
def test_falls_back_with_one_warning_when_compilation_fails(monkeypatch, failure):
    """Where neither fused implementation can be built (no C compiler for the
    native kernels, and torch.compile failing or impossible), fused=True warns
    once, naming both reasons, and runs the eager loop."""

    def broken(update):
        def kernel(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return kernel

    _break_native(monkeypatch)
    if failure == "compile error":
        monkeypatch.setattr(_fused, "compiled_update", broken)
    else:
        monkeypatch.setattr(_fused, "_why_unavailable", lambda device: "no C++ compiler")

    fused, messages = _train_cd_fused_twice()
    assert len(messages) == 1 and "falling back to the single-tensor loop" in messages[0], messages
    assert "native kernels: no C compiler" in messages[0]
    assert ("no C++ compiler" if failure == "no compiler" else "InvalidCxxCompiler") in messages[0]
    for a, b in zip(fused, _train_cd(False)):
        assert torch.equal(a, b)


@needs_compiler
@compiles_update
def test_without_native_kernels_the_cpu_step_compiles_with_one_warning(monkeypatch):
    _break_native(monkeypatch)
    fused, messages = _train_cd_fused_twice()
    assert len(messages) == 1 and "native CPU optimizer kernels unavailable (no C compiler" in messages[0], messages
    assert CD([torch.zeros(2, dtype=torch.float64)], fused=True).code_path() == "compiled"
    for a, b in zip(fused, _train_cd(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


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


# ---------------------------------------------------------------- named coefficients (issue 28)

def test_coefficients_are_named_and_derived_once():
    """Each optimizer's coefficients are its named tuple, the derived values computed
    once, by hand here: h = 0.5, lr = 2, gamma = 2, lambda = 0.1, c = 3, alpha = 4, mu = 0.25."""
    import math

    group = dict(h=0.5, lr=2.0, gamma=2.0, weight_decay=0.1, c=3.0, alpha=4.0, mu=0.25, eps=1e-8, maximize=False)
    motion = dict(kick_step=-0.5, drift_step=1.0, decay=math.exp(-0.1), linear=math.exp(-1.0))
    expected = {
        LDHD: motion,
        CD: {**motion, "two_c_h": 3.0},
        iKFAD: {**motion, "minus_half_h": -0.25, "relax_decay": math.exp(-2.0),
                "source_weight": (1 - math.exp(-2.0)) / (4.0 * 0.25)},
        CADAM: {**motion, "relax_decay": math.exp(-2.0), "source_weight": (1 - math.exp(-2.0)) / 4.0,
                "two_c_h": 3.0, "eps": 1e-8},
    }
    for cls in OURS:
        k = cls._coefficients(group)
        assert type(k) is cls.Coefficients and k._fields == tuple(expected[cls]), cls
        for name, value in expected[cls].items():
            assert getattr(k, name) == pytest.approx(value, rel=1e-15), (cls, name)
    assert CD._coefficients({**group, "maximize": True}).kick_step == 0.5


def _kernel_bodies() -> dict[str, str]:
    """Each optimizer kernel's macro in optimizers/_native.c, by kernel name: ``{"cd": "...", ...}``."""
    import re

    source = _native.SOURCE.read_text()
    bodies = re.findall(r"#define (\w+)_KERNEL\(DT\)(.*?)\n(?:ALL_DTYPES|$)", source, re.S)
    return {name.lower(): body for name, body in bodies}


def test_native_kernels_read_each_coefficient_by_its_name_once():
    """_native.c indexes k by no number, only by the constants _native.py generates from
    the coefficient tuples' fields; each kernel reads each field of its tuple exactly
    once, and nothing else (so every value crosses to C once and none is left unread)."""
    import re

    source = _native.SOURCE.read_text()
    assert not re.search(r"\bk\[\s*\d", source), "a coefficient indexed by number"
    motion = re.search(r"#define MOTION\(OPT, DT\)(.*?)\n\n", source, re.S).group(1)
    motion_fields = re.findall(r"k\[OPT##_(\w+)\]", motion)
    bodies = _kernel_bodies()
    assert set(bodies) == set(_native.kernels()) == {cls.native_kernel for cls in OURS}
    for kernel, coefficients in _native.kernels().items():
        body = bodies[kernel]
        direct = re.findall(rf"k\[{kernel.upper()}_(\w+)\]", body)
        assert len(re.findall(r"\bk\[", body)) == len(direct), kernel  # every read names its field
        read = direct + (motion_fields if f"MOTION({kernel.upper()}, DT)" in body else [])
        assert sorted(read) == sorted(f.upper() for f in coefficients._fields), kernel
    indices = _native.coefficient_indices()
    assert indices["CD_TWO_C_H"] == CD.Coefficients._fields.index("two_c_h") == 4
    assert indices["CADAM_EPS"] == len(CADAM.Coefficients._fields) - 1


def test_native_cache_key_covers_the_source_and_the_coefficient_order(tmp_path, monkeypatch):
    """A changed _native.c, or a coefficient tuple in another order, is a new library
    name in the cache, so it is built rather than an old build loaded."""
    compiler = _native._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("NONLINEAR_DAMPING_CACHE", str(tmp_path))
    original = _native._target(compiler)
    edited = tmp_path / "_native.c"
    edited.write_text(_native.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(_native, "SOURCE", edited)
    assert _native._target(compiler) != original
    monkeypatch.undo()
    monkeypatch.setenv("NONLINEAR_DAMPING_CACHE", str(tmp_path))
    assert _native._target(compiler) == original
    swapped = dict(_native.coefficient_indices(), CD_TWO_C_H=3, CD_LINEAR=4)
    monkeypatch.setattr(_native, "coefficient_indices", lambda: swapped)
    assert _native._target(compiler) != original


# ---------------------------------------------------------------- one backend choice (issue 28)

def test_code_path_reports_the_tensors_the_kernel_cannot_take(fused_backend, monkeypatch):
    """A parameter the fused kernel cannot take (a column slice, not dense, large enough
    for the compiled kernel to give it a call of its own) runs the single-tensor loop
    inside the fused step, and code_path says so: for it, and for a group of it alone.
    A lone one-element tensor: the native kernel takes it, the compiled one does not.
    What reached the native kernel is counted."""
    handed = []
    real_step = _native.step
    monkeypatch.setattr(_native, "step", lambda kernel, dtype, k, tensors: (handed.extend(t[0] for t in tensors),
                                                                           real_step(kernel, dtype, k, tensors)))
    dense, lone = torch.randn(6, 5, requires_grad=True), torch.randn(1, requires_grad=True)
    sliced = torch.randn(200, 300)[:, :200].requires_grad_()
    kernel = fused_backend.name
    for params, paths in (([sliced], ["single"]), ([dense, sliced], [kernel, "single"]),
                          ([lone], ["native" if kernel == "native" else "single"])):
        for p in params:
            p.grad = None  # the last case's: code_path answers for the tensors that have one
        opt = CD(params, h=0.1, c=2.0, fused=True)
        reference = CD([p.detach().clone().requires_grad_() for p in params], h=0.1, c=2.0, fused=False)
        assert opt.code_path() == (kernel if kernel in paths else "single")
        assert [opt.code_path(param=p) for p in params] == paths
        handed.clear()
        for o in (opt, reference):
            for p in o.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
            o.step()
        assert [opt.code_path(param=p) for p in params] == paths  # with gradients and state now
        if kernel == "native":
            assert [any(t is p for t in handed) for p in params] == [path == "native" for path in paths]
        for p, q in zip(params, reference.param_groups[0]["params"]):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_code_path_reports_the_single_tensor_loop_for_a_gradient_of_another_dtype(fused_backend):
    """A float32 parameter with a float64 gradient (``grad_dtype=None`` allows it): no
    kernel takes the pair, the step updates it eagerly, and code_path says ``single``
    for it and for its group, not the fused path it would take otherwise."""
    params = []
    for _ in range(2):
        p = torch.ones(4, requires_grad=True)
        p.grad_dtype = None
        p.grad = torch.full((4,), 2.0, dtype=torch.float64)
        params.append(p)
    fused, eager = CD([params[0]], h=0.1, c=2.0, fused=True), CD([params[1]], h=0.1, c=2.0, fused=False)
    fused.step()
    eager.step()
    assert torch.equal(params[0], params[1]) and params[0][0].item() == pytest.approx(1 - 0.01 * 2)
    assert fused.code_path() == "single"
    assert fused.code_path(param=params[0]) == "single"


def test_code_path_reports_the_fallback_before_the_first_step(monkeypatch):
    """Where neither fused implementation can be built, code_path says ``single`` from
    the start (the backend is made, and warns, when first asked for), and the backend
    says why neither was taken."""
    _break_native(monkeypatch)
    monkeypatch.setattr(_fused, "_why_unavailable", lambda device: "no C++ compiler")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = CD([torch.zeros(3, requires_grad=True)], fused=True)
        code_path_line = inspect.currentframe().f_lineno + 1
        assert opt.code_path() == "single"
        opt.param_groups[0]["params"][0].grad = torch.ones(3)
        opt.step()
    warned = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(warned) == 1
    where = (warned[0].filename, warned[0].lineno)
    assert FUSED_PATH_MUTATED or where == (__file__, code_path_line)  # the user's call
    backend = _fused.backend(CD._update, "cd", 3, 5, torch.device("cpu"), torch.float32)
    assert backend.path == "single"
    assert backend.why_not == {"native": "no C compiler (set CC, or install cc, gcc or clang)",
                               "compiled": "no C++ compiler"}


@needs_compiler
def test_compiled_step_updates_every_tensor_of_a_small_last_batch(monkeypatch):
    """An empty parameter beside a one-element one: the compiled kernel's last batch
    holds fewer than two elements, so both go through the eager loop, the
    one-element parameter included."""
    monkeypatch.setattr(_native, "ENABLED", False)
    params = [torch.zeros(0, requires_grad=True), torch.ones(1, requires_grad=True)]
    opt = CD(params, h=0.1, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert params[1].item() == pytest.approx(1 - 0.01 * 1)  # q + h * (-h g) from p = 0
    assert opt.code_path(param=params[1]) == "single"


def test_each_message_warns_once_per_process(monkeypatch):
    monkeypatch.setattr(_fused, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for message in ("first", "second", "first", "second"):
            _fused._warn(message)
    assert [str(w.message) for w in caught] == ["first", "second"]
    assert all(w.category is RuntimeWarning for w in caught)


@pytest.mark.parametrize("dtype, coefficients", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.float32)])
def test_the_kernel_is_compiled_on_scratch_tensors_of_the_device_and_dtype(monkeypatch, dtype, coefficients):
    """The warm-up call that compiles the kernel: ``WARMUP_NUMEL`` elements per tensor in the
    parameters' dtype and the coefficients in theirs (float64 for float64, else float32),
    all on the parameters' device (here "meta": no kernel is compiled, the call is recorded)."""
    calls = []
    monkeypatch.setattr(_fused, "compiled_update", lambda update: lambda *ts: calls.append(
        [(tuple(t.shape), t.dtype, t.device.type) for t in ts]))
    kernel, why = _fused._compile(_sub_update, torch.device("meta"), dtype, 3, 4)
    assert why is None and kernel is not None
    assert calls == [[((1 << 16,), dtype, "meta")] * 3 + [((4,), coefficients, "meta")]]


@pytest.mark.parametrize("error, why", [(RuntimeError("InvalidCxxCompiler: none\nsecond line"),
                                         "RuntimeError: InvalidCxxCompiler: none"),
                                        (ValueError("  \n"), "ValueError: ")])
def test_a_failed_compile_says_the_errors_type_and_first_line(monkeypatch, error, why):
    def compiled_update(update):
        def kernel(*tensors):
            raise error

        return kernel

    monkeypatch.setattr(_fused, "compiled_update", compiled_update)
    assert _fused._compile(_sub_update, torch.device("cpu"), torch.float32, 2, 1) == (None, why)


def test_compiling_is_known_impossible_without_dynamo_or_triton(monkeypatch):
    """Said without trying: dynamo unsupported here (e.g. an unsupported Python), or a
    CUDA device without Triton (the CPU needs none: Inductor writes C++ there)."""
    import torch._dynamo.eval_frame as eval_frame
    import torch.utils._triton as triton

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(triton, "has_triton", lambda: False)
    assert _fused._why_unavailable(cpu) is None
    assert _fused._why_unavailable(cuda) == "Triton is not installed"
    monkeypatch.setattr(triton, "has_triton", lambda: True)
    assert _fused._why_unavailable(cuda) is None
    monkeypatch.setattr(eval_frame, "is_dynamo_supported", lambda: False)
    for device in (cpu, cuda):
        assert _fused._why_unavailable(device) == "torch.compile does not support this Python/platform"


def test_coefficients_as_one_tensor_from_numbers_and_tensors():
    """The compiled kernel's coefficients: one 1-D tensor in the coefficient dtype,
    tensor hyperparameters (0-d or one-element) stacked with the numbers; numbers alone
    made again only when they change (``cache``)."""
    cpu = torch.device("cpu")
    k = _fused._as_tensor((torch.tensor(0.5), 2.0, torch.tensor([3.0], dtype=torch.float64)), torch.float64, cpu)
    assert k.dtype == torch.float64 and torch.equal(k, torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64))
    k = _fused._as_tensor((torch.tensor(0.25, dtype=torch.float64), 1.0), torch.bfloat16, cpu)
    assert k.dtype == torch.float32 and torch.equal(k, torch.tensor([0.25, 1.0]))
    meta = torch.device("meta")  # the parameters' device, here one that holds no numbers
    k = _fused._as_tensor((torch.tensor(0.5, device=meta), 2.0), torch.float32, meta)
    assert (k.device, k.dtype, k.shape) == (meta, torch.float32, (2,))
    k = _fused._as_tensor((0.5, 2.0), torch.float64, meta)
    assert (k.device, k.dtype, k.shape) == (meta, torch.float64, (2,))
    cache = {}
    first = _fused._as_tensor((0.5, 2.0), torch.float32, cpu, cache)
    assert _fused._as_tensor((0.5, 2.0), torch.float32, cpu, cache) is first
    changed = _fused._as_tensor((0.5, 3.0), torch.float32, cpu, cache)
    assert torch.equal(changed, torch.tensor([0.5, 3.0])) and torch.equal(first, torch.tensor([0.5, 2.0]))
    other_dtype = _fused._as_tensor((0.5, 3.0), torch.float64, cpu, cache)  # kept apart by device and dtype
    assert other_dtype.dtype == torch.float64 and _fused._as_tensor((0.5, 3.0), torch.float32, cpu, cache) is changed


def test_dense_alike_means_one_flat_array_with_one_layout():
    """The kernels may treat tensors as flat arrays when each covers its elements with no
    gap (whatever the order of its dimensions) and all share one layout."""
    def alike(*tensors):
        return _fused.dense_alike(tensors)

    a = torch.randn(3, 4)
    assert alike(a, a.clone(), torch.zeros(3, 4))
    t = torch.randn(3, 4).t()  # (4, 3), strides (1, 4): dense, dimensions in another order
    assert alike(t, t.clone(), torch.zeros(3, 4).t())
    p = torch.randn(2, 3, 4).permute(2, 0, 1)  # (4, 2, 3), strides (1, 12, 4)
    assert alike(p, torch.zeros(2, 3, 4).permute(2, 0, 1))
    c = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert alike(c, torch.zeros_like(c))
    assert alike(torch.randn(3, 1, 4).permute(2, 1, 0))  # (4, 1, 3), strides (1, 4, 4): a size-1 dimension's stride says nothing
    assert not alike(t, torch.zeros(4, 3))  # dense, laid out otherwise
    assert not alike(torch.randn(2, 6)[:, :3])  # a gap after every row
    assert not alike(torch.randn(30, 8)[:, :5].t())


def test_the_compiled_kernels_coefficients_are_made_on_the_device_once_per_change():
    """``Backend.run`` hands the compiled kernel its coefficients on the parameters'
    device, made again only when they change (the group's ``cache``). Kernel faked; the
    tensors on "meta" (a device that holds no numbers)."""
    seen = []
    backend = _fused.Backend("compiled", _sub_update, kernel=lambda q, g, k: seen.append(k))
    meta = torch.device("meta")
    bucket = [(torch.empty(_fused.SMALL_NUMEL, device=meta), torch.empty(_fused.SMALL_NUMEL, device=meta))]
    cache = {}
    for coefficients in ((0.5,), (0.5,), (0.25,)):
        backend.run(coefficients, bucket, cache)
    assert [k.device for k in seen] == [meta] * 3
    assert seen[1] is seen[0] and seen[2] is not seen[0]


def test_the_compiled_kernel_takes_large_tensors_in_place_and_small_ones_batched():
    """From ``SMALL_NUMEL`` elements on, a tensor is handed to the kernel as a flat alias
    of its own storage; a smaller one, even alone, as a concatenated copy (which also
    takes a layout the alias could not). Kernel faked: it records what it was given."""
    given = []
    backend = _fused.Backend("compiled", _sub_update, kernel=lambda q, g, k: given.append(q.data_ptr()))
    large, small = torch.zeros(_fused.SMALL_NUMEL), torch.zeros(_fused.SMALL_NUMEL - 1)
    for q in (large, small):
        backend.run((0.5,), [(q, torch.zeros_like(q))])
    assert given == [large.data_ptr(), given[1]] and given[1] != small.data_ptr()


def test_the_compiled_kernels_batches_hold_at_most_batch_numel_elements():
    backend = _fused.Backend("compiled", _sub_update, kernel=lambda *tensors: None)
    small = _fused.SMALL_NUMEL - 1  # 32767: the largest tensor batched
    assert _fused.BATCH_NUMEL == 2 * small + 2

    def schedule(*sizes):
        return backend.schedule([(torch.empty(n), torch.empty(n)) for n in sizes])

    assert schedule(small, small, 2) == ([[0, 1, 2]], [])  # exactly BATCH_NUMEL: one batch
    assert schedule(small, small, 3, small, small - 1, 3) == ([[0, 1], [2, 3, 4], [5]], [])
    assert schedule(small + 1, 10) == ([[0], [1]], [])  # SMALL_NUMEL elements: a call of its own


def test_a_tensor_subclass_takes_the_eager_loop_inside_a_compiled_step():
    class Tagged(torch.Tensor):
        pass

    backend = _fused.Backend("compiled", _sub_update, kernel=lambda *tensors: None)
    tagged = torch.zeros(_fused.SMALL_NUMEL).as_subclass(Tagged)
    plain = torch.zeros(_fused.SMALL_NUMEL)
    bucket = [(plain, torch.zeros_like(plain)), (tagged, torch.ones(_fused.SMALL_NUMEL).as_subclass(Tagged))]
    assert backend.schedule(bucket) == ([[0]], [1])
    assert backend.paths(bucket) == ["compiled", "single"]
    backend.run((0.5,), bucket)
    assert torch.equal(tagged.as_subclass(torch.Tensor), torch.full((_fused.SMALL_NUMEL,), -0.5))


def test_the_backend_says_why_each_implementation_was_not_taken(monkeypatch):
    """Compiling faked (a kernel, or a failure); nothing else is."""
    _fresh_backends(monkeypatch)
    monkeypatch.setattr(_fused, "_compile", lambda *args: (print, None))
    cpu, meta = torch.device("cpu"), torch.device("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the compiled kernel taken as planned: no warning
        own = _fused.backend(_sub_update, None, 2, 1, cpu, torch.float32)
        elsewhere = _fused.backend(CD._update, "cd", 3, 5, meta, torch.float32)
    assert (own.path, own.kernel) == ("compiled", print)
    assert own.why_not == {"native": "the optimizer has no native kernel (it has an _update of its own)"}
    assert elsewhere.why_not == {"native": "the native kernels run on the CPU only"}
    if _native.why_unavailable() is None:
        native = _fused.backend(CD._update, "cd", 3, 5, cpu, torch.float32)
        assert (native.path, native.why_not) == ("native", {"compiled": "the native kernel runs here"})
    monkeypatch.setattr(_native, "ENABLED", False)
    switched_off = _fused.backend(CD._update, "cd", 3, 5, cpu, torch.float32)
    assert switched_off.why_not == {"native": "switched off by NONLINEAR_DAMPING_NATIVE=0"}
    monkeypatch.setattr(_native, "ENABLED", True)
    monkeypatch.setattr(_native, "supports", lambda *args: False)
    monkeypatch.setattr(_native, "why_unavailable", lambda: None)  # built, but without this kernel
    no_kernel = _fused.backend(CD._update, "cd", 3, 5, cpu, torch.float16)
    assert no_kernel.why_not == {"native": "the native library has no cd kernel for torch.float16"}
    monkeypatch.setattr(_native, "why_unavailable", lambda: "no C compiler")
    with pytest.warns(RuntimeWarning) as caught:
        unbuilt = _fused.backend(CD._update, "cd", 3, 5, cpu, torch.bfloat16)
    assert [str(w.message) for w in caught] == [
        "native CPU optimizer kernels unavailable (no C compiler); the fused step uses torch.compile instead"]
    assert (unbuilt.path, unbuilt.native, unbuilt.why_not) == ("compiled", "cd", {"native": "no C compiler"})
    monkeypatch.setattr(_fused, "_compile", lambda *args: (None, "RuntimeError: boom"))
    with pytest.warns(RuntimeWarning) as caught:
        failed = _fused.backend(_sub_update, None, 2, 1, cpu, torch.float64)
    assert [str(w.message) for w in caught] == [
        "fused optimizer step unavailable on cpu (RuntimeError: boom); falling back to the single-tensor loop"]
    assert failed.path == "single" and failed.why_not["compiled"] == "RuntimeError: boom"
    with pytest.warns(RuntimeWarning) as caught:
        neither = _fused.backend(CD._update, "cd", 3, 5, cpu, torch.float64)
    assert [str(w.message) for w in caught] == [
        "fused optimizer step unavailable on cpu (native kernels: no C compiler; torch.compile: RuntimeError: boom); "
        "falling back to the single-tensor loop"]
    assert (neither.path, neither.native) == ("single", "cd")


def test_a_failed_compile_is_not_tried_again_on_that_device_type(monkeypatch):
    """Compiling costs seconds even to fail: once it failed on a device type, every other
    optimizer kernel and dtype there takes the eager loop with that reason; another device
    type still tries. (Compiling faked.)"""
    _fresh_backends(monkeypatch)
    tried = []
    monkeypatch.setattr(_fused, "_compile", lambda *args: tried.append(args) or (None, "RuntimeError: boom"))
    cpu, meta = torch.device("cpu"), torch.device("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = _fused.backend(_sub_update, None, 2, 1, cpu, torch.float32)
        again = _fused.backend(CD._update, None, 3, 5, cpu, torch.float64)
        other = _fused.backend(_sub_update, None, 2, 1, meta, torch.float32)
    assert tried == [(_sub_update, cpu, torch.float32, 2, 1), (_sub_update, meta, torch.float32, 2, 1)]
    assert [b.path for b in (first, again, other)] == ["single"] * 3
    assert again.why_not["compiled"] == "RuntimeError: boom"


def _sub_update(q, g, k):
    """A one-coefficient update that no optimizer compiles: q <- q - k[0] g."""
    q.sub_(k[0] * g)


@needs_compiler
def test_one_compiled_graph_serves_every_tensor_size(monkeypatch):
    """The kernel is compiled once, with a symbolic length: tensors of new sizes (a
    small batch, a large tensor through its own call) compile no further graph."""
    monkeypatch.setattr(_fused, "_backends", {})
    monkeypatch.setattr(_fused, "_compiled", {})
    backend = _fused.backend(_sub_update, None, 2, 1, torch.device("cpu"), torch.float64)
    assert backend.path == "compiled"
    compiled = graphs_compiled()
    for n in (3, 50, _fused.SMALL_NUMEL + 7):
        q, g = torch.ones(n, dtype=torch.float64), torch.full((n,), 2.0, dtype=torch.float64)
        backend.run((0.25,), [(q, g)])
        assert torch.equal(q, torch.full((n,), 0.5, dtype=torch.float64))  # 1 - 0.25 * 2
    assert graphs_compiled() == compiled


@needs_compiler
def test_an_update_dynamo_cannot_capture_whole_takes_the_eager_loop(monkeypatch):
    """The kernel is compiled with ``fullgraph=True``: an update with a graph break is
    not half-compiled (eager pieces between graphs, every step) but refused when the
    backend is made, which then says why and runs the update eagerly."""
    _fresh_backends(monkeypatch)

    def update(q, g, k):
        torch._dynamo.graph_break()
        q.sub_(k[0] * g)

    with pytest.warns(RuntimeWarning, match="falling back to the single-tensor loop"):
        backend = _fused.backend(update, None, 2, 1, torch.device("cpu"), torch.float32)
    assert backend.path == "single" and backend.kernel is None
    assert "graph_break" in backend.why_not["compiled"], backend.why_not
    q = torch.ones(4)
    backend.run((0.5,), [(q, torch.ones(4))])
    assert torch.equal(q, torch.full((4,), 0.5))
