"""optimizers/_base.py's pieces one at a time, milliseconds each: what the optimizers'
training tests reach only at import time (the coefficient tuples, the subclass hook, the
autograd version probe), so that a change to them fails a test that runs it, and the
arguments' validation at its edges."""
import pytest
import torch

from optimizers import _base
from optimizers._base import COMMON_ARGS, MOTION, coefficient_tuple, sgd_time_step
from optimizers.cd import CD, CDCoefficients


def test_coefficient_tuple_is_motion_then_the_fields_and_belongs_to_its_caller():
    Pair = coefficient_tuple("Pair", "two_c_h", "eps")
    assert Pair.__name__ == "Pair"
    assert Pair._fields == ("kick_step", "drift_step", "decay", "linear", "two_c_h", "eps")
    assert Pair._fields[:4] == MOTION
    assert Pair.__module__ == __name__  # as collections.namedtuple: the module that made it
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
