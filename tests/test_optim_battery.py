"""The generic checks torch applies to every optimizer of its own (the ``TestOptimRenewed``
battery over ``OptimizerInfo`` tables in torch's test/optim/test_optim.py), written for
CD, iKFAD, CADAM and LDHD.

A table of optimizer inputs (``OPTIM_INPUTS``: hyperparameter sets, each optimizer's
ablations included) and one of error inputs (``ERROR_INPUTS``); every check runs over the
table. The numbers compared are always two of our code paths or our step against itself
(save/load, deepcopy); the arithmetic itself is held to hand-checked values and exact
identities in test_optimizers.py. Small tensors throughout: the whole file runs in seconds.
"""
from __future__ import annotations

import copy
import io
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from optimizers import CADAM, CD, LDHD, iKFAD
from optimizers import _fused, _native

OURS = (CD, iKFAD, CADAM, LDHD)

# Every optimizer's inputs: its defaults at a step size that moves things, the paper's
# gamma = 0 ablation (CD0, iKFAD0, CADAM0), the options every optimizer has, and one
# set of hyperparameters far from the defaults.
OPTIM_INPUTS = {
    CD: [dict(h=0.1), dict(h=0.1, gamma=0.0), dict(h=0.05, gamma=2.0, c=30.0, lr=0.3, weight_decay=0.1),
         dict(h=0.1, maximize=True)],
    iKFAD: [dict(h=0.1), dict(h=0.1, gamma=0.0), dict(h=0.05, alpha=3.0, mu=0.2, gamma=0.5, lr=0.3, weight_decay=0.1),
            dict(h=0.1, maximize=True)],
    CADAM: [dict(h=0.1), dict(h=0.1, gamma=0.0), dict(h=0.05, gamma=2.0, c=30.0, alpha=0.5, eps=1e-3, lr=0.3,
                                                       weight_decay=0.1),
            dict(h=0.1, maximize=True)],
    LDHD: [dict(h=0.1), dict(h=0.1, gamma=0.0), dict(h=0.05, gamma=2.0, lr=0.3, weight_decay=0.1),
           dict(h=0.1, maximize=True)],
}
CASES = [(cls, kw) for cls in OURS for kw in OPTIM_INPUTS[cls]]
CASE_IDS = [f"{cls.__name__}-{i}" for cls in OURS for i in range(len(OPTIM_INPUTS[cls]))]

# (optimizer, constructor keywords, error type, message pattern): what torch's error inputs check.
_P = object()  # stands for a valid parameter list
ERROR_INPUTS = [
    (CD, dict(h=0.0), ValueError, r"Invalid h: 0.0; expected a finite number > 0"),
    (CD, dict(h=float("nan")), ValueError, r"Invalid h: nan"),
    (CD, dict(gamma=-1.0), ValueError, r"Invalid gamma: -1.0; expected a finite number >= 0"),
    (CD, dict(c=float("inf")), ValueError, r"Invalid c: inf"),
    (iKFAD, dict(alpha=0.0), ValueError, r"Invalid alpha: 0.0; expected a finite number > 0"),
    (iKFAD, dict(mu=-1.0), ValueError, r"Invalid mu: -1.0"),
    (CADAM, dict(eps=-1e-8), ValueError, r"Invalid eps: -1e-08"),
    (LDHD, dict(lr=-0.1), ValueError, r"Invalid lr: -0.1; expected a finite number >= 0"),
    (LDHD, dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay: -0.1"),
    (CD, dict(lr=torch.tensor([0.1, 0.2])), ValueError, r"Invalid lr: a tensor of shape \(2,\)"),
    (CD, dict(h=torch.tensor(1)), ValueError, r"Invalid h: a tensor of shape \(\) and dtype torch.int64"),
    (CD, dict(lr=torch.tensor([[-1.0]])), ValueError, r"Invalid lr: -1.0"),
    (CD, dict(h="0.1"), ValueError, r"Invalid h: '0.1'"),
    (CD, dict(foreach=True, fused=True), ValueError, r"Invalid foreach=True with fused=True"),
    (CD, dict(fused=1), ValueError, r"Invalid fused: 1; expected None, True or False"),
    (CD, dict(maximize=None), ValueError, r"Invalid maximize: None; expected False or True"),
]


@pytest.mark.parametrize("cls,kwargs,error,match", ERROR_INPUTS,
                         ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _, _ in ERROR_INPUTS])
def test_errors(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_errors_in_an_added_param_group():
    opt = CD([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"Invalid c: -2.0"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "c": -2.0})


# ---------------------------------------------------------------- the paths

# The step's code paths, by constructor keywords; "fused" is the native kernel on this CPU.
PATHS = {"single": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


@pytest.fixture(params=list(PATHS))
def path(request):
    if request.param == "fused" and _native.why_unavailable() is not None:
        pytest.skip(f"native kernels unavailable: {_native.why_unavailable()}")
    return request.param


def _params(dtypes=(torch.float64,), seed=0):
    """A few parameters of several shapes (a matrix, a vector, a scalar-like one) per dtype."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for dtype in dtypes:
        for shape in ((3, 4), (5,), (1,)):
            out.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_())
    return out


def _steps(opt, params, n, seed=1):
    """``n`` steps with fixed pseudo-random gradients (the same for every optimizer)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        opt.step()


def _run(cls, kwargs, n=5, dtypes=(torch.float64,), **path):
    params = _params(dtypes)
    opt = cls(params, **{**kwargs, **path})
    _steps(opt, params, n)
    return params, opt


def _assert_same_steps(a, b, rtol=None, atol=None):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
        for name in oa.state_names:
            torch.testing.assert_close(oa.state[x][name], ob.state[y][name], rtol=rtol, atol=atol)


# ---------------------------------------------------------------- tensor hyperparameters

@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1", "1x1"])
@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_tensor_hyperparameters(cls, kwargs, shape, path):
    """torch's test_tensor_lr, for every hyperparameter: a one-element tensor of shape
    [], [1] or [1, 1] gives the steps the same float gives, on every path."""
    numbers = {k: v for k, v in kwargs.items() if k != "maximize"}
    tensors = {k: torch.tensor(float(v), dtype=torch.float64).reshape(shape) for k, v in numbers.items()}
    flags = {**PATHS[path], "maximize": kwargs.get("maximize", False)}
    _assert_same_steps(_run(cls, numbers, **flags), _run(cls, tensors, **flags), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", OURS)
def test_in_place_change_of_the_users_tensor_is_seen(cls, path):
    """A scheduler (or the user) changes a tensor hyperparameter in place: the step
    follows, whatever the tensor's shape. lr = 0 leaves the parameters where they are."""
    lr = torch.ones(1, 1, dtype=torch.float64)
    params = _params()
    opt = cls(params, h=0.1, lr=lr, **PATHS[path])
    _steps(opt, params, 1)
    before = [p.detach().clone() for p in params]
    lr.fill_(0.0)
    _steps(opt, params, 2, seed=2)
    for p, q in zip(params, before):
        assert torch.equal(p, q)
    opt.param_groups[0]["lr"].fill_(1.0)  # the group's own entry: the user's tensor changes with it
    assert lr.item() == 1.0


def test_tensor_lr_assigned_after_construction_and_in_an_older_state_dict():
    """A [1]-shaped tensor put into a group later, or loaded from a state dict saved by
    an older version (whose groups kept the shape), steps as the float does."""
    ref = _run(CD, dict(h=0.1, lr=0.5), n=3)
    params = _params()
    opt = CD(params, h=0.1)
    opt.param_groups[0]["lr"] = torch.tensor([0.5], dtype=torch.float64)
    _steps(opt, params, 3)
    _assert_same_steps(ref, (params, opt), rtol=1e-12, atol=1e-14)

    params = _params()
    opt = CD(params, h=0.1)
    old = opt.state_dict()
    old["param_groups"][0]["lr"] = torch.tensor([[0.5]], dtype=torch.float64)
    opt.load_state_dict(old)
    assert opt.param_groups[0]["lr"].shape == ()
    _steps(opt, params, 3)
    _assert_same_steps(ref, (params, opt), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- derived paths vs the for-loop

@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_derived_path_matches_the_forloop(cls, kwargs, impl):
    """torch's test_foreach_matches_forloop / test_fused_matches_forloop: parameters of
    every floating dtype in one group; the state and the parameters after 7 foreach
    steps, or 1 fused step (low-precision rounding differs between them by design),
    equal the single-tensor loop's to 5x the dtype's default tolerance."""
    if impl == "fused" and _native.why_unavailable() is not None:
        pytest.skip("native kernels unavailable")
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    n = 7 if impl == "foreach" else 1
    ref = _run(cls, kwargs, n=n, dtypes=dtypes, **PATHS["single"])
    new = _run(cls, kwargs, n=n, dtypes=dtypes, **PATHS[impl])
    for (x, y) in zip(ref[0], new[0]):
        rtol, atol = torch.testing._comparison.get_tolerances(x.dtype, rtol=None, atol=None)
        if x.dtype in (torch.float16, torch.bfloat16):
            # torch's CPU foreach ops and the tensor ops round a 16-bit product differently
            # now and then (one ulp), and iKFAD's feedback amplifies it over 7 steps.
            atol = 1e-4
        torch.testing.assert_close(x, y, rtol=5 * rtol, atol=5 * atol)
        for name in cls.state_names:
            torch.testing.assert_close(ref[1].state[x][name], new[1].state[y][name], rtol=5 * rtol, atol=5 * atol)


# ---------------------------------------------------------------- no gradients, empty parameters

@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_step_is_noop_when_no_parameter_has_a_gradient(cls, kwargs, path):
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = cls(params, **kwargs, **PATHS[path])
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert len(opt.state) == 0


@pytest.mark.parametrize("cls", OURS)
def test_zero_gradients_from_rest_move_nothing(cls, path):
    """From zero state a zero gradient leaves every parameter and state element at rest
    (no weight decay): the dynamics' fixed point."""
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = cls(params, h=0.1, **PATHS[path])
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(torch.count_nonzero(s) == 0 for st in opt.state.values() for s in st.values())


@pytest.mark.parametrize("cls", OURS)
def test_zero_size_parameter(cls, path):
    params = _params() + [torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)]
    opt = cls(params, h=0.1, **PATHS[path])
    _steps(opt, params, 2)
    assert opt.state[params[-1]]["momentum"].shape == (0, 3)


# ---------------------------------------------------------------- state dicts

@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_state_dict_deterministic(cls, kwargs):
    """torch's test_state_dict_deterministic: an optimizer loaded from another's state
    dict takes the same steps from then on, and its own state dict is the same."""
    params, opt = _run(cls, kwargs, n=3)
    clone = [p.detach().clone().requires_grad_() for p in params]
    opt2 = cls(clone, **kwargs)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _steps(opt, params, 3, seed=5)
    _steps(opt2, clone, 3, seed=5)
    _assert_same_steps((params, opt), (clone, opt2), rtol=0, atol=0)
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == sd2["param_groups"]
    for i in sd["state"]:
        for name in cls.state_names:
            assert torch.equal(sd["state"][i][name], sd2["state"][i][name])


@pytest.mark.parametrize("cls", OURS)
def test_can_load_older_state_dict(cls):
    """A state dict from before ``lr``, ``maximize``, ``foreach`` and ``fused`` existed
    loads with their defaults and steps as before."""
    params, opt = _run(cls, dict(h=0.1), n=2)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in ("lr", "maximize", "foreach", "fused"):
            del group[key]
    clone = [p.detach().clone().requires_grad_() for p in params]
    opt2 = cls(clone, h=0.1)
    opt2.load_state_dict(old)
    assert {k: opt2.param_groups[0][k] for k in ("lr", "maximize", "foreach", "fused")} == \
        dict(lr=1.0, maximize=False, foreach=None, fused=None)
    _steps(opt, params, 2, seed=3)
    _steps(opt2, clone, 2, seed=3)
    _assert_same_steps((params, opt), (clone, opt2), rtol=0, atol=0)


@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_save_load_equality_with_weights_only(cls, kwargs):
    """torch.save of the state dict, torch.load(weights_only=True): the same state dict,
    and the loaded optimizer continues identically; tensor hyperparameters too."""
    kwargs = {**kwargs, "lr": torch.tensor(0.5, dtype=torch.float64)}
    params, opt = _run(cls, kwargs, n=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    clone = [p.detach().clone().requires_grad_() for p in params]
    opt2 = cls(clone, **kwargs)
    opt2.load_state_dict(loaded)
    _steps(opt, params, 2, seed=4)
    _steps(opt2, clone, 2, seed=4)
    _assert_same_steps((params, opt), (clone, opt2), rtol=0, atol=0)


# ---------------------------------------------------------------- hooks, deepcopy, repr

@pytest.mark.parametrize("cls", OURS)
def test_hooks(cls):
    """Step pre/post hooks and state-dict (load) pre/post hooks run, in order, and can be removed."""
    params = _params()
    opt = cls(params, h=0.1)
    calls = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
        opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre")),
        opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post")),
        opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre")),
        opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post")),
    ]
    _steps(opt, params, 1)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd-pre", "sd-post", "load-pre", "load-post"]
    for handle in handles:
        handle.remove()
    _steps(opt, params, 1)
    opt.load_state_dict(opt.state_dict())
    assert len(calls) == 6


@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_deepcopy_copies_all_public_attrs_and_steps_alike(cls, kwargs, path):
    params, opt = _run(cls, kwargs, n=2, **PATHS[path])
    twin = copy.deepcopy(opt)
    public = [name for name in vars(opt) if not name.startswith("_")]
    assert public and public == [name for name in vars(twin) if not name.startswith("_")]
    assert twin.defaults.items() >= opt.defaults.items()  # torch's __setstate__ adds "differentiable"
    twin_params = twin.param_groups[0]["params"]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(params, twin_params))
    _steps(opt, params, 2, seed=6)
    _steps(twin, twin_params, 2, seed=6)
    _assert_same_steps((params, opt), (twin_params, twin), rtol=0, atol=0)
    assert cls.__name__ in repr(opt)


# ---------------------------------------------------------------- peak memory of the foreach path

class PeakTemporaries(TorchDispatchMode):
    """Bytes of tensors created by ops inside the mode and still referenced: their peak.

    The CPU counterpart of torch's ``torch.cuda.max_memory_allocated`` in
    test_peak_memory_foreach: in-place ops (outputs sharing an input's storage) add
    nothing, a new tensor adds its storage until it is garbage."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.owned: dict[int, int] = {}

    def _free(self, key):
        self.live -= self.owned.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                key = t.untyped_storage().data_ptr()
                if key not in inputs and key not in self.owned:
                    self.owned[key] = t.untyped_storage().nbytes()
                    self.live += self.owned[key]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key)
        return out


@pytest.mark.parametrize("tensor_hyperparameters", [False, True], ids=["floats", "tensors"])
@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_peak_memory_foreach(cls, kwargs, tensor_hyperparameters):
    """torch's budget: a foreach step (after the one that creates the state) holds at most
    one whole-list temporary more than the single-tensor loop at its peak."""
    nparams = 10
    if tensor_hyperparameters:
        kwargs = {k: v if k == "maximize" else torch.tensor(float(v)) for k, v in kwargs.items()}
    peaks = []
    for foreach in (False, True):
        params = [torch.rand(16, 8) for _ in range(nparams)]
        opt = cls(params, foreach=foreach, fused=False, **kwargs)
        for p in params:
            p.grad = torch.rand_like(p)
        opt.step()
        with PeakTemporaries() as mode:
            opt.step()
        peaks.append(mode.peak)
    single, multi = peaks
    intermediate = nparams * 16 * 8 * 4
    assert multi <= single + intermediate, (single, multi, intermediate)


# ---------------------------------------------------------------- fused where no kernel exists

@pytest.mark.parametrize("cls", OURS)
def test_fused_error_on_params_on_meta(cls):
    """torch's test_fused_error_on_params_on_meta: fused=True on meta tensors raises
    RuntimeError with torch's message; the same optimizer steps once the model is real;
    fused=None on meta picks a path that runs."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1))
    opt = cls(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match=r"`fused=True` requires all the params to be floating point Tensors "
                                           r"of supported devices: \['cpu', 'cuda'\].* but torch.float32 and meta"):
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()

    with torch.device("meta"):
        model = torch.nn.Linear(2, 3)
        opt = cls(model.parameters())
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    opt.step()
    assert opt.code_path() in ("single", "foreach")


# ---------------------------------------------------------------- the compiled fused step's coefficients

def test_compiled_fused_step_makes_its_coefficient_tensor_once_per_change(monkeypatch):
    """The compiled kernel's coefficients go to the device only when a hyperparameter
    changed (a host-to-device copy per step on CUDA otherwise). Counted on the CPU, with
    the kernel run eagerly (what is counted is the tensor creation, not the compiler)."""
    monkeypatch.setattr(_native, "ENABLED", False)
    monkeypatch.setattr(_fused, "_backends", {})
    monkeypatch.setattr(_fused, "_compile", lambda update, *args: (update, None))
    made = []
    real = torch.tensor

    def counting(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    params = [torch.randn(40000, requires_grad=True), torch.randn(7, requires_grad=True)]
    opt = CADAM(params, h=0.1, fused=True)
    assert opt.code_path() == "compiled"
    monkeypatch.setattr(torch, "tensor", counting)
    for step in range(6):
        if step == 3:
            opt.param_groups[0]["lr"] = 0.5  # as a scheduler does for a float lr
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    monkeypatch.setattr(torch, "tensor", real)
    assert len(made) == 2, made
