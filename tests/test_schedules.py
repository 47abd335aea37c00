"""``lr``, LR schedulers, ``maximize``, tensor hyperparameters, compiled training
steps, and starting from a tuned Adam or SGD: the optimizers as drop-in
``torch.optim`` optimizers (issue 12)."""
import copy
import math

import pytest
import torch
from torch.optim import lr_scheduler

from conftest import compiles_update

from optimizers import CADAM, CD, LDHD, build, iKFAD

from test_optimizers import AdamNoBiasCorrection, assert_same, make_problem, train

OURS = [LDHD, CD, iKFAD, CADAM]
# Hyperparameters where every sub-step does something.
HP = {
    LDHD: dict(h=0.2, gamma=0.5),
    CD: dict(h=0.2, gamma=0.5, c=3.0),
    iKFAD: dict(h=0.2, gamma=0.5, alpha=0.7, mu=0.4),
    CADAM: dict(h=0.05, gamma=0.5, c=3.0, alpha=0.7, eps=1e-8),
}


def gradients(steps, seed=0, dtype=torch.float64):
    """A fixed gradient sequence for two parameter tensors, whatever the parameters do."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, generator=g, dtype=dtype), torch.randn(3, generator=g, dtype=dtype))
            for _ in range(steps)]


def run_fixed_gradients(make, steps=12, schedule=None, dtype=torch.float64):
    """Feed ``gradients(steps)`` to ``make(params)``; returns the per-step position
    updates, the momenta after each step, and the lr each step ran with."""
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(5, 3, generator=g, dtype=dtype).requires_grad_(),
              torch.randn(3, generator=g, dtype=dtype).requires_grad_()]
    opt = make(params)
    sched = schedule(opt) if schedule else None
    deltas, momenta, lrs = [], [], []
    for grads in gradients(steps, dtype=dtype):
        before = [p.detach().clone() for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        deltas.append([p.detach() - b for p, b in zip(params, before)])
        momenta.append([opt.state[p]["momentum"].clone() for p in params])
        if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)  # a loss that never improves: the lr drops every patience + 1 steps
        elif sched is not None:
            sched.step()
    return deltas, momenta, lrs


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_lr_multiplies_the_position_update_and_nothing_else(cls, step_path):
    """With the same gradients, lr = 0.3 moves q by 0.3 times what lr = 1 moves it,
    step after step, and leaves the momentum's dynamics exactly as they were."""
    make = lambda lr: (lambda p: cls(p, lr=lr, **HP[cls], **step_path.kwargs))
    deltas_1, momenta_1, _ = run_fixed_gradients(make(1.0))
    deltas_s, momenta_s, _ = run_fixed_gradients(make(0.3))
    for step in range(len(deltas_1)):
        for a, b in zip(deltas_s[step], deltas_1[step]):
            torch.testing.assert_close(a, 0.3 * b, rtol=1e-10, atol=1e-14)
        for a, b in zip(momenta_s[step], momenta_1[step]):
            assert torch.equal(a, b)
    assert step_path.ran(cls, torch.float64)


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_lr_one_is_the_default_bit_for_bit(cls, step_path):
    assert_same(train(lambda p: cls(p, **HP[cls], **step_path.kwargs)),
                train(lambda p: cls(p, lr=1.0, **HP[cls], **step_path.kwargs)), tol=0)


SCHEDULES = {
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    "LinearLR": lambda opt: lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=6),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=12),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4), lr_scheduler.CosineAnnealingLR(opt, T_max=8)],
        milestones=[4]),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=12, cycle_momentum=False),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_schedulers_scale_the_update_as_scheduled(cls, schedule, step_path):
    """Each step's position update is the scheduled lr times the unscheduled one."""
    make = lambda p: cls(p, **HP[cls], **step_path.kwargs)
    reference, _, _ = run_fixed_gradients(make)
    deltas, _, lrs = run_fixed_gradients(make, schedule=SCHEDULES[schedule])
    assert len(set(lrs)) > 2  # the schedule really moved
    for step, lr in enumerate(lrs):
        for a, b in zip(deltas[step], reference[step]):
            torch.testing.assert_close(a, lr * b, rtol=1e-10, atol=1e-14)
    if schedule == "LinearLR":  # annealed to 0: the parameters stop moving
        assert lrs[-1] == 0.0 and all(torch.equal(d, torch.zeros_like(d)) for d in deltas[-1])
    assert step_path.ran(cls, torch.float64)


def test_onecycle_momentum_cycling_is_refused_with_torchs_message():
    """OneCycleLR cycles ``momentum`` or ``betas`` by default; these optimizers have
    neither (their momentum decay is exp(-gamma h)), so it needs cycle_momentum=False."""
    opt = CD([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="momentum"):
        lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)


def test_lr_is_validated_and_accepted_by_build():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"Invalid lr: -1.0; expected a finite number >= 0"):
        CD(p, lr=-1.0)
    with pytest.raises(ValueError, match=r"Invalid lr: inf"):
        build("cadam0", p, lr=float("inf"))
    for name in ("ldhd", "cd", "cd0", "ikfad", "ikfad0", "cadam", "cadam0"):
        assert build(name, p, lr=0.5, h=0.1).param_groups[0]["lr"] == 0.5
    assert build("adam", p, lr=0.01).param_groups[0]["lr"] == 0.01


# ---------------------------------------------------------------- maximize

@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_maximize(cls, step_path):
    """maximize=True on f takes exactly the steps of minimising -f, and f goes up."""
    X = torch.randn(16, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(maximize, sign):
        w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        opt = cls([w], maximize=maximize, **HP[cls], **step_path.kwargs)
        values = []
        for _ in range(15):
            opt.zero_grad()
            f = -((X @ w - 1.0) ** 2).mean()  # concave, maximum at the least-squares solution
            values.append(f.item())
            (sign * f).backward()
            opt.step()
        return w.detach(), values

    w_max, values = run(True, 1.0)
    w_min, _ = run(False, -1.0)
    assert torch.equal(w_max, w_min)
    assert values[-1] > values[0] + 0.1
    assert step_path.ran(cls, torch.float64)
    with pytest.raises(ValueError, match="Invalid maximize: 1; expected False or True"):
        cls([torch.zeros(1, requires_grad=True)], maximize=1)


# ---------------------------------------------------------------- tensor hyperparameters

@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_tensor_hyperparameters_match_python_numbers(cls, step_path):
    """Every hyperparameter as a 0-d tensor gives the steps the same floats give."""
    hp = {**HP[cls], "lr": 0.7, "weight_decay": 0.05}
    as_tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in hp.items()}
    assert_same(train(lambda p: cls(p, **hp, **step_path.kwargs)),
                train(lambda p: cls(p, **as_tensors, **step_path.kwargs)), tol=1e-12)
    assert step_path.ran(cls, torch.float64)


def test_bad_tensor_hyperparameters_raise():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"Invalid h: a tensor of shape \(2,\)"):
        CD(p, h=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"Invalid gamma: -1.0; expected a finite number >= 0"):
        CD(p, gamma=torch.tensor(-1.0))
    with pytest.raises(ValueError, match=r"Invalid c: a tensor of shape \(\) and dtype torch.int64"):
        CD(p, c=torch.tensor(3))


@compiles_update
@pytest.mark.parametrize("foreach", [True, False])
def test_inside_a_compiled_step_the_foreach_flag_picks_the_traced_ops(foreach):
    """Traced by an outer torch.compile, the step is plain tensor ops (no nested kernel):
    foreach ops where ``foreach=True`` asks for them, per-tensor ops otherwise."""
    ops = []

    def backend(gm, example_inputs):  # records the traced graph's functions, runs it as traced
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    net = torch.nn.Linear(3, 2)
    opt = CD(net.parameters(), h=0.1, foreach=foreach)
    net(torch.randn(4, 3)).sum().backward()
    torch.compile(opt.step, backend=backend)()
    assert ops and any("_foreach_" in op for op in ops) is foreach


def _frames(counter) -> int:
    return counter.frame_count


@compiles_update
@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_compiled_training_step_never_recompiles_for_tensor_hyperparameters(cls):
    """A whole training step (forward, backward, step, zero_grad) under torch.compile:
    tensor hyperparameters changed at every step are graph inputs, so nothing is
    compiled again after the first steps, and the numbers are the eager step's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref = copy.deepcopy(net)
    hp = {k: torch.tensor(float(v)) for k, v in {**HP[cls], "lr": 1.0}.items()}
    opt = cls(net.parameters(), **hp)
    opt_ref = cls(ref.parameters(), **{k: v.clone() for k, v in hp.items()})
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def train_step(model, optimizer):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(train_step, backend=counter)
    frames = []
    for step in range(8):
        for o in (opt, opt_ref):  # as a scheduler for tensor lr does: in place
            o.param_groups[0]["lr"].fill_(1.0 / (1 + step))
            o.param_groups[0]["h"].fill_(HP[cls]["h"] * (1 + 0.1 * step))
        compiled(net, opt)
        train_step(ref, opt_ref)
        frames.append(_frames(counter))
    # The state is created by ``_init_group``, which dynamo runs before tracing (as for
    # torch.optim's optimizers): nothing is compiled again after the first step.
    assert frames[0] >= 1 and frames[-1] == frames[0], frames
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _frames_under_schedule(make, change, steps=6) -> list:
    """Frames dynamo compiled (aot_eager: its graph passes without Inductor's codegen)
    after each step of a compiled training step, with ``change(optimizer, step)``
    between steps, as a scheduler does. A param group per parameter (as for weight
    decay on the weights only)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = make([{"params": [net.weight]}, {"params": [net.bias]}])
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def train_step():
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(train_step, backend=counter)
    frames = []
    for step in range(steps):
        compiled()
        change(opt, step)
        frames.append(counter.frame_count)
    return frames


def _decay(opt, step):
    """A float ``lr`` (and ``h``, where there is one) changed in every group."""
    for group in opt.param_groups:
        group["lr"] = 1.0 / (2 + step)
        if "h" in group:
            group["h"] = 0.05 / (2 + step)


@pytest.fixture(scope="module")
def adamw_frames():
    return _frames_under_schedule(lambda p: torch.optim.AdamW(p, lr=1e-3), _decay)


@compiles_update
@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_compiled_training_step_recompiles_for_float_schedules_no_more_than_adamw(cls, adamw_frames):
    """A float ``lr`` (and ``h``) changed at every step: as many compiled frames as
    torch.optim.AdamW with its float lr scheduled alike (one recompile, after which the
    float is a graph input), not one per value until dynamo's limit."""
    adamw = adamw_frames
    ours = _frames_under_schedule(lambda p: cls(p, **HP[cls]), _decay)
    assert ours[-1] <= adamw[-1] and ours[-1] == ours[2], (ours, adamw)


# ---------------------------------------------------------------- from a tuned Adam or SGD

def test_cadam_from_adam_is_adam_without_bias_correction():
    lr, betas, eps = 3e-3, (0.85, 0.99), 1e-7
    assert_same(
        train(lambda p: CADAM.from_adam(p, lr=lr, betas=betas, eps=eps)),
        train(lambda p: AdamNoBiasCorrection(p, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps)),
        tol=1e-10,
    )
    opt = CADAM.from_adam([torch.zeros(1, requires_grad=True)], lr=lr, betas=betas, eps=eps, c=1e3)
    group = opt.param_groups[0]
    assert group["c"] == 1e3 and math.isclose(math.exp(-group["gamma"] * group["h"]), betas[0])
    assert math.isclose(math.exp(-group["alpha"] * group["h"]), betas[1])


def test_cadam_from_adam_follows_adams_schedule():
    """The same LambdaLR on both: Adam's lr and CADAM's multiplier scale the same update."""
    lr, betas, eps = 3e-3, (0.9, 0.995), 1e-8

    def scheduled(make, steps=30):
        X, y, W, b = make_problem(0)
        params = [W.clone().requires_grad_(), b.clone().requires_grad_()]
        opt = make(params)
        sched = lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + 0.5 * step))
        for _ in range(steps):
            opt.zero_grad()
            ((X @ params[0] + params[1] - y) ** 2).mean().backward()
            opt.step()
            sched.step()
        return [p.detach() for p in params]

    assert_same(scheduled(lambda p: CADAM.from_adam(p, lr=lr, betas=betas, eps=eps)),
                scheduled(lambda p: AdamNoBiasCorrection(p, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps)),
                tol=1e-10)


@pytest.mark.parametrize("cls", [LDHD, CD], ids=lambda c: c.__name__)
def test_from_sgd_is_momentum_sgd(cls):
    lr, momentum = 0.05, 0.9
    assert_same(train(lambda p: cls.from_sgd(p, lr=lr, momentum=momentum)),
                train(lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum)), tol=1e-10)
    assert CD.from_sgd([torch.zeros(1, requires_grad=True)], lr=lr, momentum=momentum, c=7.0).param_groups[0]["c"] == 7.0


def test_from_adam_defaults_are_torchs_adam_and_each_argument_is_checked():
    """``from_adam``'s defaults are torch.optim.Adam's (lr 1e-3, betas (0.9, 0.999), eps 1e-8);
    each beta must lie in (0, 1), eps must be a finite number >= 0 (0 allowed, as in torch)."""
    p = [torch.zeros(1, requires_grad=True)]
    group = {k: v for k, v in CADAM.from_adam(p).param_groups[0].items() if k != "params"}
    torch_adam = {k: v for k, v in CADAM.from_adam(p, lr=1e-3, betas=(0.9, 0.999), eps=1e-8).param_groups[0].items()
                  if k != "params"}
    assert group == torch_adam
    assert CADAM.from_adam(p, eps=0.0).param_groups[0]["eps"] == 0.0
    for betas, name in (((0.9, 1.0), "beta2"), ((0.9, 0.0), "beta2"), ((0.0, 0.999), "beta1"), ((True, 0.999), "beta1"),
                        ((0.9, "0.999"), "beta2")):
        with pytest.raises(ValueError, match=rf"^Invalid {name}: .*; expected a number in \(0, 1\)$"):
            CADAM.from_adam(p, betas=betas)
    for eps in (-1e-8, float("inf"), float("nan"), True, "1e-8", None):
        with pytest.raises(ValueError, match=r"^Invalid eps: .*; expected a finite number >= 0$"):
            CADAM.from_adam(p, eps=eps)


def test_from_adam_and_from_sgd_validate():
    p = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ValueError, match=r"Invalid beta1: 1.0; expected a number in \(0, 1\)"):
        CADAM.from_adam(p, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"Invalid momentum: 0.0; expected a number in \(0, 1\]"):
        CD.from_sgd(p, lr=0.1, momentum=0.0)
    with pytest.raises(ValueError, match=r"Invalid lr: 0; expected a finite number > 0"):
        LDHD.from_sgd(p, lr=0, momentum=0.9)


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_lr_scales_the_decoupled_weight_decay_too(cls, step_path):
    """lr = 0 stops the parameters even with weight decay on (as AdamW's lr scales its
    decay); lr = 0.5 decays q by exp(-lambda 0.5 h) where the gradient is zero."""
    q = torch.ones(6, dtype=torch.float64, requires_grad=True)
    opt = cls([q], lr=0.0, weight_decay=0.3, **HP[cls], **step_path.kwargs)
    q.grad = torch.randn(6, dtype=torch.float64)
    opt.step()
    assert torch.equal(q.detach(), torch.ones(6, dtype=torch.float64))
    opt.param_groups[0]["lr"] = 0.5
    q.grad = torch.zeros(6, dtype=torch.float64)
    opt.state.clear()
    opt.step()
    torch.testing.assert_close(q.detach(), torch.full((6,), math.exp(-0.3 * 0.5 * HP[cls]["h"]), dtype=torch.float64),
                               rtol=1e-12, atol=0)
