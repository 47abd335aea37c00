"""The optimizers against exact oracles: hand-checked values, the SGD and Adam identities, exact sub-flows (optimizers/README.md, "Exact equivalences")."""
import copy
import io
import math

import pytest
import torch

import optimizers
from optimizers import CADAM, CD, LDHD, build, iKFAD

OURS = [LDHD, CD, iKFAD, CADAM]


def quadratic(q):
    return (q[0] ** 2 + 10 * q[1] ** 2) / 2


def run_quadratic(cls, steps, **hp):
    q = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    opt = cls([q], **hp)
    for _ in range(steps):
        opt.zero_grad()
        quadratic(q).backward()
        opt.step()
    return q.detach()


HAND_CHECKED = [
    (LDHD, dict(h=0.1, gamma=1.0), (0.99095162582, 0.909516258196), (-0.000200421036, 0.004337341278)),
    (CD, dict(h=0.1, gamma=1.0, c=10.0), (0.99, 0.9), (0.003527706639, 0.000358087238)),
    (iKFAD, dict(h=0.1, gamma=1.0, alpha=1.0, mu=1.0), (0.99, 0.9), (-0.00255503551, 0.001176296954)),
    (
        CADAM,
        dict(h=0.01, gamma=1.0, c=10.0, alpha=1.0, eps=1e-8),
        (0.998997499061, 0.998997498971),
        (0.519670026305, 0.82319657917),
    ),
]


@pytest.mark.parametrize("cls,hp,one,hundred", HAND_CHECKED, ids=lambda x: getattr(x, "__name__", None))
def test_hand_checked_values(cls, hp, one, hundred, step_path):
    torch.testing.assert_close(run_quadratic(cls, 1, **step_path.kwargs, **hp), torch.tensor(one, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(run_quadratic(cls, 100, **step_path.kwargs, **hp), torch.tensor(hundred, dtype=torch.float64), rtol=0, atol=1e-9)
    assert step_path.ran(cls, torch.float64)


# ---------------------------------------------------------------- exact identities

def make_problem(seed=0):
    """A small least-squares problem with two parameter tensors, float64."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = torch.randn(32, 3, generator=g, dtype=torch.float64)
    W = torch.randn(5, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    return X, y, W, b


def train(opt_fn, steps=30, seed=0):
    X, y, W, b = make_problem(seed)
    params = [W.clone().requires_grad_(), b.clone().requires_grad_()]
    opt = opt_fn(params)
    for _ in range(steps):
        opt.zero_grad()
        ((X @ params[0] + params[1] - y) ** 2).mean().backward()
        opt.step()
    return [p.detach() for p in params]


def assert_same(a, b, tol=1e-12):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_ldhd_is_momentum_sgd():
    h, gamma = 0.3, 0.7
    e = math.exp(-gamma * h)
    assert_same(
        train(lambda p: LDHD(p, h=h, gamma=gamma)),
        train(lambda p: torch.optim.SGD(p, lr=h * h * e, momentum=e)),
    )


def test_cd_without_cubic_term_is_momentum_sgd():
    h, gamma = 0.3, 0.7
    assert_same(
        train(lambda p: CD(p, h=h, gamma=gamma, c=0.0)),
        train(lambda p: torch.optim.SGD(p, lr=h * h, momentum=math.exp(-gamma * h))),
    )


class AdamNoBiasCorrection(torch.optim.Optimizer):
    """Adam written out without bias correction, as the spec's identity states it."""

    def __init__(self, params, lr, beta1, beta2, eps):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["m"].mul_(group["beta1"]).add_(p.grad, alpha=1 - group["beta1"])
                st["v"].mul_(group["beta2"]).addcmul_(p.grad, p.grad, value=1 - group["beta2"])
                p.sub_(group["lr"] * st["m"] / (st["v"].sqrt() + group["eps"]))


@pytest.mark.parametrize("foreach", [False, True])
def test_cadam_without_cubic_term_is_adam_without_bias_correction(foreach):
    h, gamma, alpha, eps = 0.05, 2.0, 3.0, 1e-8
    b1, b2 = math.exp(-gamma * h), math.exp(-alpha * h)
    assert_same(
        train(lambda p: CADAM(p, h=h, gamma=gamma, c=0.0, alpha=alpha, eps=eps, foreach=foreach)),
        train(lambda p: AdamNoBiasCorrection(p, lr=h * h * math.sqrt(alpha) / (1 - b1), beta1=b1, beta2=b2, eps=eps * math.sqrt(alpha))),
        tol=1e-10,
    )


def ikfad_distance_to_cd(h, alphas, gamma=0.5, c=3.0, time=6.0):
    """Max parameter distance between iKFAD (mu alpha = 1/c) and CD after the same time."""
    steps = round(time / h)
    cd = train(lambda p: CD(p, h=h, gamma=gamma, c=c), steps=steps)
    out = []
    for alpha in alphas:
        ik = train(lambda p: iKFAD(p, h=h, gamma=gamma, alpha=alpha, mu=1 / (c * alpha)), steps=steps)
        out.append(max((a - b).abs().max().item() for a, b in zip(ik, cd)))
    return out


def test_ikfad_approaches_cd_as_alpha_grows():
    # The two schemes discretise p' = -c p^3 differently, so at fixed h the limit
    # alpha -> infinity leaves a discretisation gap that vanishes as h -> 0.
    errors = ikfad_distance_to_cd(0.02, (1.0, 1e1, 1e2, 1e3, 1e4))
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02 * errors[0], errors
    coarse = ikfad_distance_to_cd(0.2, (1e4,))[0]
    assert errors[-1] < coarse / 5, (errors[-1], coarse)


def test_cubic_damping_step_is_exact_flow():
    """Step 3 of CD against a fine RK4 solve of p' = -c p^3."""
    from optimizers._base import cubic_damping

    c, h = 7.0, 0.3
    p0 = torch.linspace(-3, 3, 13, dtype=torch.float64)
    p = p0.clone()
    cubic_damping(p, 2 * c * h)  # its coefficient is 2 c h (the optimizers compute it once per step)
    x, n = p0.clone(), 20000
    dt = h / n
    f = lambda v: -c * v**3
    for _ in range(n):
        k1 = f(x); k2 = f(x + dt / 2 * k1); k3 = f(x + dt / 2 * k2); k4 = f(x + dt * k3)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(p, x, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- two paths, one answer

@pytest.mark.parametrize("cls", OURS)
def test_foreach_matches_single_tensor(cls):
    def run(foreach):
        g = torch.Generator().manual_seed(1)
        shapes = [(7, 3), (5,), (2, 3, 4), (1,), (6,)]
        params = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
        frozen = params[-1]  # never gets a gradient
        groups = [
            {"params": params[:2], "h": 0.1},
            {"params": params[2:], "h": 0.05, "gamma": 0.3, "weight_decay": 0.1},
        ]
        opt = cls(groups, foreach=foreach)
        for _ in range(20):
            opt.zero_grad()
            loss = sum((p**2).sum() * (i + 1) + p.sin().sum() for i, p in enumerate(params[:-1]))
            loss.backward()
            opt.step()
        assert frozen not in opt.state
        return params, opt

    a, opt_a = run(False)
    b, opt_b = run(True)
    assert_same(a, b)
    for p, q in zip(a[:-1], b[:-1]):
        for name in cls.state_names:
            torch.testing.assert_close(opt_a.state[p][name], opt_b.state[q][name], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- torch.optim behaviour

def build_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def net_steps(net, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 4, generator=g, dtype=torch.float64)
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("cls", OURS)
@pytest.mark.parametrize("through_file", [False, True])
def test_state_dict_round_trip(cls, through_file):
    net = build_net()
    opt = cls(net.parameters(), h=0.1)
    net_steps(net, opt, 10, seed=1)
    net_steps(net, opt, 10, seed=2)
    uninterrupted = [p.detach().clone() for p in net.parameters()]

    net = build_net()
    opt = cls(net.parameters(), h=0.1)
    net_steps(net, opt, 10, seed=1)
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), opt.state_dict()
    if through_file:
        buf = io.BytesIO()
        torch.save({"net": saved_net, "opt": saved_opt}, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        saved_net, saved_opt = loaded["net"], loaded["opt"]
    net2 = build_net(seed=99)
    net2.load_state_dict(saved_net)
    opt2 = cls(net2.parameters(), h=0.1)
    opt2.load_state_dict(saved_opt)
    net_steps(net2, opt2, 10, seed=2)
    assert_same(uninterrupted, [p.detach() for p in net2.parameters()], tol=0)


@pytest.mark.parametrize("cls", OURS)
def test_deepcopy_repr_closure_and_hyperparameter_mutation(cls):
    net = build_net()
    opt = cls(net.parameters(), h=0.1)
    text = repr(opt)
    assert cls.__name__ in text and "h: 0.1" in text
    clone = copy.deepcopy(opt)
    assert clone.param_groups[0]["h"] == 0.1

    x = torch.randn(8, 4, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = net(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.ndim == 0
    # A scheduler-style change of h takes effect on the next step.
    before = [p.detach().clone() for p in net.parameters()]
    for group in opt.param_groups:
        group["h"] = 0.0 + 1e-12
    opt.step(closure)
    for a, p in zip(before, net.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-9)
    assert all(type(v) is float for g in opt.param_groups for k, v in g.items() if k not in ("params", "foreach", "fused", "maximize"))


@pytest.mark.parametrize("cls", OURS)
def test_parameters_without_grad_are_skipped(cls):
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt = cls([a, b], h=0.1)
    a.sum().backward()
    opt.step()
    assert b not in opt.state and torch.equal(b, torch.ones(3))
    assert set(opt.state[a]) == set(cls.state_names)


@pytest.mark.parametrize("cls", OURS)
def test_weight_decay_is_exact_flow_and_zero_is_noop(cls):
    q = torch.full((4,), 2.0, dtype=torch.float64, requires_grad=True)
    opt = cls([q], h=0.5, weight_decay=0.2)
    q.grad = torch.zeros_like(q)
    opt.step()
    torch.testing.assert_close(q.detach(), torch.full((4,), 2.0 * math.exp(-0.1), dtype=torch.float64), rtol=0, atol=1e-15)
    assert_same(train(lambda p: cls(p, h=0.1)), train(lambda p: cls(p, h=0.1, weight_decay=0.0)), tol=0)


@pytest.mark.parametrize("cls", OURS)
def test_gradscaler_skip_leaves_everything_unchanged(cls, step_path):
    net = build_net().float()
    opt = cls(net.parameters(), h=0.1, **step_path.kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(8, 4)
    scaler.scale(net(x).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert step_path.ran(cls, torch.float32)
    params = [p.detach().clone() for p in net.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    scaler.scale(net(x).pow(2).mean() * float("inf")).backward()
    scaler.step(opt)  # found inf: skipped
    scaler.update()
    for a, p in zip(params, net.parameters()):
        assert torch.equal(a, p.detach())
    for k, st in opt.state_dict()["state"].items():
        for name, t in st.items():
            assert torch.equal(t, state[k][name])


@pytest.mark.parametrize("cls", OURS)
def test_bf16_parameters(cls, step_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2).to(torch.bfloat16)
    opt = cls(net.parameters(), h=0.1, **step_path.kwargs)
    x = torch.randn(16, 4, dtype=torch.bfloat16)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = net(x).float().pow(2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert step_path.ran(cls, torch.bfloat16)
    for st in opt.state.values():
        assert all(t.dtype == torch.bfloat16 for t in st.values())
    assert math.isfinite(loss.item()) and loss.item() < first


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = CD(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


# ---------------------------------------------------------------- validation

BAD = [
    (LDHD, "h", 0.0), (LDHD, "h", -1.0), (LDHD, "gamma", -0.1), (LDHD, "weight_decay", -1e-3),
    (CD, "h", float("nan")), (CD, "gamma", -1.0), (CD, "c", -1.0), (CD, "c", float("inf")),
    (iKFAD, "alpha", 0.0), (iKFAD, "mu", 0.0), (iKFAD, "mu", -2.0), (iKFAD, "gamma", float("-inf")),
    (CADAM, "eps", -1e-8), (CADAM, "alpha", -1.0), (CADAM, "c", -1.0), (CADAM, "h", float("inf")),
    (CADAM, "weight_decay", float("nan")),
]


@pytest.mark.parametrize("cls,name,value", BAD)
def test_bad_hyperparameters_raise(cls, name, value):
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=rf"Invalid {name}: .*{value}"):
        cls(p, **{name: value})
    opt = cls(p)
    with pytest.raises(ValueError, match=rf"Invalid {name}"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], name: value})
    assert len(opt.param_groups) == 1


def test_foreach_must_be_bool_or_none():
    with pytest.raises(ValueError, match="foreach"):
        CD([torch.zeros(1, requires_grad=True)], foreach="yes")


# ---------------------------------------------------------------- build

def test_build_names_and_keys():
    assert optimizers.NAMES == ("adam", "msgd", "ldhd", "cd", "cd0", "ikfad", "ikfad0", "cadam", "cadam0")
    p = [torch.zeros(2, requires_grad=True)]
    adam = build("Adam", p, lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-6)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.8, 0.9)
    sgd = build("MSGD", p, lr=0.1, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    ik0 = build("ikfad0", p, h=0.4941, alpha=2.196, mu=4.552e-6)
    assert isinstance(ik0, iKFAD) and ik0.param_groups[0]["gamma"] == 0.0
    assert build("cadam0", p).param_groups[0]["gamma"] == 0.0
    assert isinstance(build("CD", p, h=0.5, gamma=1e-3, c=1e5), CD)
    with pytest.raises(ValueError, match="gamma.*valid: h, c"):
        build("cd0", p, gamma=1.0)
    with pytest.raises(ValueError, match="Unknown optimizer 'rmsprop'.*adam, msgd, ldhd"):
        build("rmsprop", p)
    with pytest.raises(ValueError, match="betas.*valid: lr, beta1, beta2, eps"):
        build("adam", p, betas=(0.9, 0.99))


def test_registry_states_each_optimizers_facts():
    cd0, adam = optimizers.info("CD0"), optimizers.info("adam")
    assert cd0.hyperparameters == ("h", "c", "lr", "weight_decay") and cd0.switches == ("maximize", "foreach", "fused")
    assert adam.hyperparameters == ("lr", "beta1", "beta2", "eps", "weight_decay")
    assert [optimizers.info(n).step_size for n in optimizers.NAMES] == ["lr", "lr"] + ["h"] * 7
    assert [optimizers.info(n).label for n in ("msgd", "ikfad0", "cadam")] == ["mSGD", "iKFAD0", "CADAM"]
    assert sorted(["cadam", "zzz", "adam", "cd0"], key=optimizers.sort_key) == ["adam", "cd0", "cadam", "zzz"]
    for cls in OURS:  # the shared arguments are written once and filled into every docstring
        assert "{common_args}" not in cls.__doc__ and "maximize: follow ``+grad f``" in cls.__doc__
    from harness.robustness import step_size_name

    assert step_size_name("cd") == "h" and step_size_name("msgd") == "lr"


# ---------------------------------------------------------------- real training

DIGITS_SETTINGS = {
    "adam": dict(lr=1e-2),
    "msgd": dict(lr=0.05, momentum=0.9),
    "ldhd": dict(h=0.3, gamma=1.0),
    "cd": dict(h=0.3, gamma=0.5, c=10.0),
    "cd0": dict(h=0.3, c=10.0),
    "ikfad": dict(h=0.3, alpha=1.0, mu=0.1, gamma=0.5),
    "ikfad0": dict(h=0.3, alpha=1.0, mu=0.1),
    "cadam": dict(h=0.03, gamma=2.0, c=10.0, alpha=1.0),
    "cadam0": dict(h=0.03, c=10.0, alpha=1.0),
}


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("name", optimizers.NAMES)
def test_trains_an_mlp_on_digits(name, digits):
    X, y = digits
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = build(name, net.parameters(), **DIGITS_SETTINGS[name])
    loss_fn = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        start = loss_fn(net(X), y).item()
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(X), (64,), generator=g)
        opt.zero_grad()
        loss_fn(net(X[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        end = loss_fn(net(X), y).item()
    assert end < 0.4 * start, (start, end)
