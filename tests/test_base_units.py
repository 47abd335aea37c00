"""optimizers/_base.py's pieces one at a time, milliseconds each: what the optimizers'
training tests reach only at import time (the coefficient tuples, the subclass hook, the
autograd version probe), so that a change to them fails a test that runs it, and the
arguments' validation at its edges."""
import math

import pytest
import torch

from optimizers import _base
from optimizers._base import COMMON_ARGS, MOTION, coefficient_tuple, sgd_time_step
from optimizers.cd import CD, CDCoefficients


def test_coefficient_tuple_is_motion_then_the_fields_and_belongs_to_its_caller():
    Pair = coefficient_tuple("Pair", "two_c_h", "eps", module=__name__)
    assert Pair.__name__ == "Pair"
    assert Pair._fields == ("kick_step", "drift_step", "decay", "linear", "two_c_h", "eps")
    assert Pair._fields[:4] == MOTION
    assert Pair.__module__ == __name__
    assert Pair(1.0, 2.0, 3.0, 4.0, 5.0, 6.0).eps == 6.0
    assert CDCoefficients.__module__ == "optimizers.cd"


def test_the_version_probe_matches_torch():
    """torch.autograd.graph.increment_version takes a list of tensors from torch 2.5 on."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert _base._increments_lists() is ((major, minor) >= (2, 5))


@pytest.mark.parametrize("lists", [True, False])
def test_each_tensor_version_is_bumped_once(lists, monkeypatch):
    monkeypatch.setattr(_base, "_INCREMENT_LISTS", lists and _base._increments_lists())
    a, b = torch.zeros(2), torch.zeros(3)
    before = a._version, b._version
    _base._increment_versions([a, b])
    assert (a._version, b._version) == (before[0] + 1, before[1] + 1)


def test_a_subclass_that_restates_update_runs_no_parents_kernel():
    """A subclass's own ``_update`` is not what the parent's C kernel computes: without a
    ``native_kernel`` of its own it has none; naming one, or not overriding ``_update``,
    keeps it."""
    class Restated(CD):
        @staticmethod
        def _update(q, g, p, k):
            CD._update(q, g, p, k)

    class Named(CD):
        native_kernel = "cd"

        @staticmethod
        def _update(q, g, p, k):
            CD._update(q, g, p, k)

    class Plain(CD):
        pass

    assert (Restated.native_kernel, Named.native_kernel, Plain.native_kernel) == (None, "cd", "cd")


def test_common_args_fill_a_subclass_docstring():
    class Documented(CD):
        """Documented.

        Args:
    {common_args}
        """

    class Undocumented(CD):
        pass

    assert "{common_args}" not in Documented.__doc__
    assert COMMON_ARGS.strip("\n") in Documented.__doc__
    assert Documented.__doc__.startswith("Documented.\n")
    assert Undocumented.__doc__ is None
    assert "{common_args}" not in CD.__doc__ and COMMON_ARGS.strip("\n") in CD.__doc__


def test_sgd_time_step_edges():
    """exp(-gamma h) = momentum and h^2 * factor = lr: momentum 1 is no friction."""
    assert sgd_time_step(0.01, 1.0, 1.0) == (0.1, 0.0)
    assert sgd_time_step(0.04, 1, 4.0) == (0.1, 0.0)
    for momentum in (0.0, -0.5, 1.5, 2.0, True, "0.9", None, float("nan")):
        with pytest.raises(ValueError, match=r"^Invalid momentum: .*; expected a number in \(0, 1\]$"):
            sgd_time_step(0.01, momentum, 1.0)


def test_check_positive_lr_takes_finite_positive_numbers_only():
    _base.check_positive_lr(1e-3)
    _base.check_positive_lr(2)
    for lr in (0.0, -1e-3, float("inf"), float("nan"), True, "0.1", None, torch.tensor(0.1)):
        with pytest.raises(ValueError, match=r"^Invalid lr: .*; expected a finite number > 0$"):
            _base.check_positive_lr(lr)


def test_as_scalar_views_a_one_element_tensor_as_0d_and_leaves_the_rest():
    for shape in ((1,), (1, 1), (1, 1, 1)):
        t = torch.full(shape, 0.5)
        s = _base.as_scalar(t)
        assert s.shape == () and s.item() == 0.5
        t.fill_(0.25)  # a view: the user's in-place change (a scheduler's fill_) is seen
        assert s.item() == 0.25
    zero_d, two, empty = torch.tensor(0.5), torch.ones(2), torch.ones(0)
    assert _base.as_scalar(zero_d) is zero_d
    assert _base.as_scalar(two) is two and _base.as_scalar(empty) is empty
    assert _base.as_scalar(0.5) == 0.5 and _base.as_scalar(None) is None


def test_a_state_dict_from_before_the_options_loads_with_their_defaults():
    """A state dict saved before lr, maximize, foreach and fused existed loads with lr 1 (the
    paper's step), maximize False and the default paths, as the constructor's defaults."""
    p = [torch.zeros(3, requires_grad=True)]
    old = CD(p, h=0.1).state_dict()
    for key in ("lr", "maximize", "foreach", "fused"):
        del old["param_groups"][0][key]
    opt = CD(p, h=0.2, lr=0.5, maximize=True, foreach=True)
    opt.load_state_dict(old)
    group = opt.param_groups[0]
    assert (group["h"], group["lr"], group["maximize"], group["foreach"], group["fused"]) == (0.1, 1.0, False, None, None)


def test_fused_true_on_a_device_or_dtype_no_kernel_takes_is_torchs_error():
    opt = CD([torch.zeros(3, requires_grad=True)], fused=True)
    message = ("`fused=True` requires all the params to be floating point Tensors of supported devices: "
               "['cpu', 'cuda'] and dtypes ['torch.float16', 'torch.bfloat16', 'torch.float32', 'torch.float64'] "
               "but {dtype} and {device}; use fused=None or False")
    for device, dtype in ((torch.device("meta"), torch.float32), (torch.device("cpu"), torch.complex64)):
        with pytest.raises(RuntimeError) as error:
            opt.code_path(device=device, dtype=dtype)
        assert str(error.value) == message.format(dtype=dtype, device=device.type)


def test_code_path_of_a_tensor_that_is_no_parameter_of_the_optimizer_is_a_one_line_error():
    opt = CD([torch.zeros(3, requires_grad=True)], foreach=True)
    assert opt.code_path(param=opt.param_groups[0]["params"][0]) == "foreach"
    with pytest.raises(ValueError) as error:
        opt.code_path(param=torch.zeros(3, requires_grad=True))
    assert str(error.value) == "Invalid param: not a parameter of this optimizer's param groups"


def test_code_path_answers_for_the_group_asked_for():
    first, second = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = CD([{"params": [first], "foreach": True}, {"params": [second], "foreach": False}])
    assert opt.code_path() == "foreach"
    assert opt.code_path(group=opt.param_groups[1]) == "single"
    assert opt.code_path(param=second) == "single"


def test_code_path_is_for_the_parameters_with_a_gradient_where_any_has_one():
    """A step updates only the parameters with a gradient: here one whose gradient is laid
    out otherwise (the eager loop's), not the one without a gradient (the kernel's)."""
    with_grad, without = torch.zeros(3, 4, requires_grad=True), torch.zeros(3, 4, requires_grad=True)
    opt = CD([with_grad, without], fused=True)
    kernel = opt.code_path()
    if kernel == "single":
        pytest.skip("no fused kernel can be built here")
    with_grad.grad = torch.zeros(4, 3).t()
    assert opt.code_path() == "single"
    # asked for it, the one without a gradient is taken to get one laid out as itself
    assert (opt.code_path(param=with_grad), opt.code_path(param=without)) == ("single", kernel)


def test_a_tensor_rate_or_time_step_gives_a_tensor_coefficient():
    """exp(-rate h) and (1 - exp(-rate h)) / rate: a tensor when either factor is one (a graph
    input under torch.compile), a float otherwise; the same numbers."""
    for rate, h in ((torch.tensor(2.0, dtype=torch.float64), 0.5), (2.0, torch.tensor(0.5, dtype=torch.float64))):
        decay, weight = _base.decay_factor(rate, h), _base.relax_weight(rate, h)
        assert isinstance(decay, torch.Tensor) and isinstance(weight, torch.Tensor)
        assert abs(decay.item() - math.exp(-1.0)) < 1e-15 and abs(weight.item() - (1 - math.exp(-1.0)) / 2) < 1e-15
    assert isinstance(_base.decay_factor(2.0, 0.5), float) and isinstance(_base.relax_weight(2.0, 0.5), float)


def test_cubic_damping_by_hand():
    """p <- p / sqrt(1 + 2 c h p^2), also at 2 c h = 1 exactly; at 0 nothing changes."""
    p = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    _base.cubic_damping(p, 1.0)
    assert p.tolist() == [1 / math.sqrt(2.0), -2 / math.sqrt(5.0), 0.0]
    _base.cubic_damping(p, 0.0)
    assert p.tolist() == [1 / math.sqrt(2.0), -2 / math.sqrt(5.0), 0.0]


def test_code_path_of_a_state_laid_out_otherwise_is_the_eager_loop():
    """A momentum laid out otherwise than its parameter (one loaded from a checkpoint written
    by another model's layout) cannot share the kernel's flat offsets."""
    q = torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    opt = CD([q], fused=True)
    q.grad = torch.zeros_like(q)
    kernel = opt.code_path()
    if kernel == "single":
        pytest.skip("no fused kernel can be built here")
    opt.state[q]["momentum"] = torch.zeros(2, 3, 4, 5)  # contiguous, not channels-last
    assert opt.code_path() == "single"


def test_code_path_given_only_a_device_or_only_a_dtype_takes_the_other_from_the_first_parameter():
    opt = CD([torch.zeros(3, requires_grad=True)])
    default = opt.code_path()
    assert opt.code_path(device=torch.device("cpu")) == default
    assert opt.code_path(dtype=torch.float32) == default


def test_scale_multiplies_by_any_factor_and_skips_only_one():
    x = torch.tensor([1.0, -3.0], dtype=torch.float64)
    _base.scale(x, 2.0)
    assert x.tolist() == [2.0, -6.0]
    _base.scale(x, 1.0)
    assert x.tolist() == [2.0, -6.0]
    _base.scale([x], 0.5)
    assert x.tolist() == [1.0, -3.0]


def test_a_parameter_without_a_gradient_is_skipped_and_the_rest_of_its_group_steps():
    frozen, trained = torch.zeros(2, requires_grad=True), torch.ones(1, requires_grad=True)
    trained.grad = torch.ones(1)
    opt = CD([frozen, trained], h=0.1)
    opt.step()
    assert frozen not in opt.state and torch.equal(frozen, torch.zeros(2))
    assert trained.item() == pytest.approx(1 - 0.01 * 1)  # q + h * (-h g) from p = 0


def test_sparse_gradients_and_complex_parameters_are_refused_naming_the_optimizer():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match=r"^CD does not support sparse gradients$"):
        CD([p]).step()
    z = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match=r"^CD does not support complex parameters$"):
        CD([z]).step()


def test_a_one_element_tensor_hyperparameter_assigned_after_building_is_viewed_as_0d():
    """As a scheduler may assign it: a [1]-shaped ``lr`` steps a 0-d parameter as the
    number 0.5 does (a [1]-shaped coefficient would not broadcast into it), and the
    group then holds a 0-d view of the very tensor assigned."""
    p, ref = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
    p.grad, ref.grad = torch.tensor(1.0), torch.tensor(1.0)
    opt, opt_ref = CD([p], h=0.1, foreach=False), CD([ref], h=0.1, lr=0.5, foreach=False)
    lr = torch.tensor([0.5])
    opt.param_groups[0]["lr"] = lr
    opt.step()
    opt_ref.step()
    assigned = opt.param_groups[0]["lr"]
    assert assigned.shape == () and assigned.data_ptr() == lr.data_ptr()
    assert torch.equal(p, ref) and p.item() != 0


def test_a_dtensor_is_stepped_as_its_local_shard():
    """FSDP2 and tensor parallelism hand the optimizer DTensors: each rank steps its own
    shard (``to_local``). Anything else, a tensor subclass with a ``to_local`` but no
    device mesh among them, is stepped as it is."""

    class Sharded:  # what _local asks of a DTensor
        device_mesh = "mesh"

        def to_local(self):
            return "shard"

    class MeshOnly:
        device_mesh = "mesh"

    class LocalOnly:
        def to_local(self):
            return "converted"

    sharded, mesh_only, local_only = Sharded(), MeshOnly(), LocalOnly()
    assert _base._local(sharded) == "shard"
    assert _base._local(mesh_only) is mesh_only and _base._local(local_only) is local_only
    assert _base._local(None) is None


def test_fused_none_without_a_native_kernel_takes_the_compiled_one_from_4m_elements(monkeypatch):
    """fused=None where no native kernel runs (CUDA; here the CPU with them switched off):
    the compiled kernel for models of 2**22 elements or more in all (its compile time then
    pays off), the single-tensor loop below that; an explicit foreach choice wins.
    (``_fused.backend`` faked: nothing is compiled.)"""
    from optimizers import _fused, _native

    monkeypatch.setattr(_native, "ENABLED", False)
    asked = []
    monkeypatch.setattr(_fused, "backend", lambda update, *args: asked.append(args) or _fused.Backend("compiled", update))
    half = 1 << 21
    at = [torch.zeros(half, requires_grad=True), torch.zeros(half, requires_grad=True)]
    below = [torch.zeros(half, requires_grad=True), torch.zeros(half - 1, requires_grad=True)]
    assert CD(at).code_path() == "compiled"
    # CD's kernel: 3 tensors (q, g, its momentum) and 5 coefficients (kick_step, drift_step,
    # decay, linear, two_c_h)
    assert asked == [("cd", 3, 5, torch.device("cpu"), torch.float32)]
    assert CD(below).code_path() == "single"
    assert CD([torch.zeros(10, requires_grad=True)]).code_path() == "single"
    assert CD(at, foreach=True).code_path() == "foreach" and CD(at, foreach=False).code_path() == "single"
    groups = [{"params": at[:1]}, {"params": at[1:]}]  # the whole model counts, not the group
    assert CD(groups).code_path() == "compiled"


def test_a_param_group_added_later_has_its_flags_checked():
    opt = CD([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"^Invalid fused: 'yes'; expected None, True or False$"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "fused": "yes"})
    with pytest.raises(ValueError, match=r"^Invalid maximize: None; expected False or True$"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "maximize": None})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "fused": None, "foreach": None,
                         "maximize": False})
    opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "maximize": True})
    assert len(opt.param_groups) == 3


def test_foreach_none_takes_the_foreach_path_on_devices_with_foreach_kernels():
    """As torch.optim: foreach by default where torch has fast foreach kernels (CUDA),
    the single-tensor loop on the CPU (asked for a device and dtype: no CUDA needed)."""
    opt = CD([torch.zeros(2, requires_grad=True)], fused=False)
    assert opt.code_path() == "single"
    assert opt.code_path(device=torch.device("cuda"), dtype=torch.float32) == "foreach"
    assert CD([torch.zeros(2, requires_grad=True)], fused=False, foreach=False).code_path(
        device=torch.device("cuda"), dtype=torch.float32) == "single"


def test_a_bad_hyperparameter_names_its_valid_range():
    p = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ValueError, match=r"^Invalid h: 0\.0; expected a finite number > 0$"):
        CD(p, h=0.0)
    with pytest.raises(ValueError, match=r"^Invalid gamma: -1\.0; expected a finite number >= 0$"):
        CD(p, gamma=-1.0)


def test_a_subclass_that_leaves_out_lr_and_maximize_gets_their_defaults():
    class Fixed(CD):
        def __init__(self, params):
            _base.DampedOptimizer.__init__(self, params, dict(h=0.1, gamma=0.5, c=1.0, weight_decay=0.0))

    group = Fixed([torch.zeros(1, requires_grad=True)]).param_groups[0]
    assert (group["lr"], group["maximize"], group["foreach"], group["fused"]) == (1.0, False, None, None)


def test_bad_flags_and_values_are_one_line_errors_naming_them():
    p = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ValueError, match=r"^Invalid foreach: 'yes'; expected None, True or False$"):
        CD(p, foreach="yes")
    with pytest.raises(ValueError, match=r"^Invalid foreach=True with fused=True; choose at most one of them$"):
        CD(p, foreach=True, fused=True)
    for value in (True, "0.1"):
        with pytest.raises(ValueError, match=rf"^Invalid h: {value!r}; expected a finite number > 0 "
                                             r"\(a Python number or a 0-d tensor\)$"):
            CD(p, h=value)
