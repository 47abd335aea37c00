"""harness.data piece by piece, with fake token bins, models and datasets (milliseconds each;
no training): the seeds, the batch sources' positions, the evaluations' sums over batches and ranks."""
from itertools import islice

import numpy as np
import pytest
import torch

from harness import data as hdata
from harness.data import (EpochBatches, EvalShard, LMEvaluation, RandomTokenBatches, _SeededItems,
                          classification_evaluate, derive_seed, eval_loader, move, reduce_sum, set_generator_state)
from harness.run import Run


def cpu_run(seed=1, rank=0, world_size=1):
    return Run(cfg={"seed": seed}, dir=None, device=torch.device("cpu"), rank=rank, world_size=world_size)


class Bins:
    """Token bins whose batch is one draw of the generator: x = [[d, d, ...]] * batch, y = x + 1."""

    def __init__(self):
        self.calls = []

    def get_batch(self, split, batch_size, block_size, generator):
        self.calls.append((split, batch_size, block_size))
        d = int(torch.randint(1000, (1,), generator=generator))
        x = torch.full((batch_size, block_size), d)
        return x, x + 1


class MeanModel(torch.nn.Module):
    """``model(x, y) -> (None, loss)`` with loss the mean of x (a batch's loss is its token)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, y):
        self.seen.append(x[:, 0].tolist())
        assert torch.equal(y, x + 1)
        return None, x.double().mean()


# --------------------------------------------------------------------------- move, seeds, sums

def test_move_keeps_the_containers_and_leaves_other_values():
    x, y = torch.arange(3), torch.ones(2)
    moved = move({"a": [x, (y, 5)], "b": "text"}, torch.device("cpu"))
    assert list(moved) == ["a", "b"] and type(moved["a"]) is list and type(moved["a"][1]) is tuple
    assert moved["a"][0] is x and moved["a"][1][0] is y and moved["a"][1][1] == 5 and moved["b"] == "text"
    assert move(x.double(), "meta").device.type == "meta"  # a device given by name, not pinned (not "cuda")


def test_derive_seed_is_63_bits_and_differs_for_any_other_keys():
    seeds = {derive_seed(s, r, e) for s in range(20) for r in range(4) for e in range(4)}
    assert len(seeds) == 20 * 4 * 4
    assert derive_seed(1, 2) != derive_seed(2, 1) and derive_seed(1, 2) != derive_seed(1, 2, 1)
    seeds |= {derive_seed(s, r) for s in range(20) for r in range(4)}
    assert all(isinstance(s, int) and 0 <= s < 2 ** 63 for s in seeds)
    assert max(seeds) >= 2 ** 62  # the top bit of 63 used
    assert derive_seed(np.int64(7), 2.0) == derive_seed(7, 2)  # numpy and float keys as their ints
    # numpy's SeedSequence (its entropy the keys): the first of two 64-bit words, shifted to 63 bits
    assert derive_seed(1337, 0, 0) == int(np.random.SeedSequence([1337, 0, 0]).generate_state(2, np.uint64)[0]) >> 1


def test_set_generator_state_takes_a_state_of_another_dtype():
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    expected = torch.rand(3, generator=g)
    set_generator_state(g, state.to(torch.int64))  # as a checkpoint may bring it back
    assert torch.equal(torch.rand(3, generator=g), expected)


def test_set_generator_state_brings_a_state_on_another_device_to_the_cpu():
    # a checkpoint loaded with map_location a GPU brings the states there: seen here through a
    # stand-in for such a tensor, which says where it is asked to go
    g = torch.Generator().manual_seed(5)
    state, asked = g.get_state(), []
    expected = torch.rand(3, generator=g)

    class OnGPU:
        def to(self, device=None, dtype=None):  # Tensor.to(device, dtype)'s form
            asked.append((None if device is None else torch.device(device), dtype))
            return state

    set_generator_state(g, OnGPU())
    assert asked == [(torch.device("cpu"), torch.uint8)] and torch.equal(torch.rand(3, generator=g), expected)


def test_reduce_sum_is_float64_and_all_reduced_over_ranks(monkeypatch):
    assert reduce_sum(cpu_run(), [1, 2.5]) == [1.0, 2.5]
    seen = []

    def all_reduce(t):  # two ranks holding the same values
        seen.append(t.dtype)
        t.mul_(2)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    assert reduce_sum(cpu_run(world_size=2), [1, 2 ** 53 + 1]) == [2.0, 2.0 ** 54 + 2]  # exact: float64
    assert seen == [torch.float64]
    assert reduce_sum(cpu_run(), [3]) == [3.0] and len(seen) == 1  # one process: no collective


# --------------------------------------------------------------------------- RandomTokenBatches

def test_random_token_batches_are_one_stream_per_seed_and_rank_and_resume():
    bins = Bins()
    first = lambda source, k: [int(x[0, 0]) for x, _ in islice(source.batches(), k)]
    a = RandomTokenBatches(bins, 3, 5, seed=1)
    assert bins.calls == [] and first(a, 4) == first(RandomTokenBatches(bins, 3, 5, seed=1, rank=0), 4)
    assert bins.calls[-1] == ("train", 3, 5)
    others = [RandomTokenBatches(bins, 3, 5, seed=s, rank=r) for s, r in ((2, 0), (1, 1), (0, 1))]
    streams = [first(a, 6)] + [first(b, 6) for b in others]
    assert len({tuple(s) for s in streams}) == 4
    # the offsets' generator is seeded by (seed, 0, rank): rank 0's is (seed, 0, 0), as every committed run's
    for rank in (0, 1, 2):
        by_hand = int(np.random.SeedSequence([1, 0, rank]).generate_state(2, np.uint64)[0]) >> 1
        g = torch.Generator().manual_seed(by_hand)
        assert first(RandomTokenBatches(bins, 3, 5, seed=1, rank=rank), 2) == [
            int(torch.randint(1000, (1,), generator=g)) for _ in range(2)]
    # no rank's training stream starts where the validation batches' do: (seed, 1) fixed, (seed, 2) fresh
    trains = {RandomTokenBatches(bins, 3, 5, seed=1, rank=r).generator.initial_seed() for r in range(4)}
    assert len(trains) == 4 and not trains & {derive_seed(1, 1), derive_seed(1, 2)}
    # the state is the position: a copy loaded with it goes on where the first is
    state = a.state_dict()
    assert set(state) == {"generator"}
    ahead = first(a, 3)
    b = RandomTokenBatches(bins, 3, 5, seed=9, split="val")
    b.load_state_dict(state)
    assert first(b, 3) == ahead and bins.calls[-1] == ("val", 3, 5)


# --------------------------------------------------------------------------- LMEvaluation

def draws(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(1000, (1,), generator=g)) for _ in range(n)]


def test_lm_evaluation_means_the_batches_of_each_estimator():
    run, model = cpu_run(seed=4), MeanModel()
    evaluate = LMEvaluation(run, Bins(), 2, 3, 5, ["fixed", "fresh"])
    fixed, fresh = draws(derive_seed(4, 1), 5), draws(derive_seed(4, 2), 10)
    assert evaluate(model, 0) == [{"split": "val", "loss": sum(fixed) / 5, "loss_fixed": sum(fixed) / 5,
                                   "loss_fresh": sum(fresh[:5]) / 5}]
    assert model.seen == [[d, d] for d in fixed + fresh[:5]]  # one batch per forward on a CPU
    state = evaluate.state_dict()
    assert set(state) == {"fresh"}
    # the fixed batches again; the fresh ones go on
    assert evaluate(model, 1) == [{"split": "val", "loss": sum(fixed) / 5, "loss_fixed": sum(fixed) / 5,
                                   "loss_fresh": sum(fresh[5:]) / 5}]
    bins = Bins()
    again = LMEvaluation(run, bins, 2, 3, 5, ["fresh"], split="train")
    again.load_state_dict(state)
    assert again(model, 1) == [{"split": "train", "loss": sum(fresh[5:]) / 5}]  # one estimator: no loss_<name>
    assert bins.calls == [("train", 2, 3)] * 5  # the batches of its split, of its size
    assert LMEvaluation(cpu_run(seed=4), Bins(), 2, 3, 5)(model, 0) == [{"split": "val", "loss": sum(fixed) / 5}]


def test_lm_evaluation_splits_batches_over_ranks_with_equal_forwards(monkeypatch):
    # rank 1 of 2, 5 batches: it computes batches 1 and 3, and a third forward (batch 0 again)
    # that rank 0, with batches 0, 2 and 4, also makes; the sum over ranks is divided by 5
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(1))
    model = MeanModel()
    d = draws(derive_seed(4, 1), 5)
    [record] = LMEvaluation(cpu_run(seed=4, rank=1, world_size=2), Bins(), 2, 3, 5, ["fixed"])(model, 0)
    assert model.seen == [[d[1]] * 2, [d[3]] * 2, [d[0]] * 2]
    assert record == {"split": "val", "loss": (d[1] + d[3]) / 5}
    model.seen.clear()
    [record] = LMEvaluation(cpu_run(seed=4, rank=0, world_size=2), Bins(), 2, 3, 5, ["fixed"])(model, 0)
    assert model.seen == [[d[0]] * 2, [d[2]] * 2, [d[4]] * 2]
    assert record == {"split": "val", "loss": (d[0] + d[2] + d[4]) / 5}


def test_lm_evaluation_puts_several_batches_in_one_forward_where_told(monkeypatch):
    # 12 tokens per forward, batches of 2 x 3 tokens: two batches per forward
    monkeypatch.setattr(hdata, "EVAL_TOKENS_PER_FORWARD", {"cpu": 12})
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(1))
    model, d = MeanModel(), draws(derive_seed(4, 1), 7)
    assert LMEvaluation(cpu_run(seed=4), Bins(), 2, 3, 5, ["fixed"])(model, 0)[0]["loss"] == pytest.approx(sum(d[:5]) / 5)
    assert model.seen == [[d[0]] * 2 + [d[1]] * 2, [d[2]] * 2 + [d[3]] * 2, [d[4]] * 2]
    # rank 1 of 2 with 7 batches: batches 1, 3, 5 in two forwards; rank 0 has 0, 2, 4, 6, also two
    model.seen.clear()
    [record] = LMEvaluation(cpu_run(seed=4, rank=1, world_size=2), Bins(), 2, 3, 7, ["fixed"])(model, 0)
    assert model.seen == [[d[1]] * 2 + [d[3]] * 2, [d[5]] * 2]
    assert record["loss"] == pytest.approx((d[1] + d[3] + d[5]) / 7)
    # fewer tokens per forward than a batch holds: still one batch per forward
    monkeypatch.setattr(hdata, "EVAL_TOKENS_PER_FORWARD", {"cpu": 5})
    model.seen.clear()
    LMEvaluation(cpu_run(seed=4), Bins(), 2, 3, 2, ["fixed"])(model, 0)
    assert model.seen == [[d[0]] * 2, [d[1]] * 2]
    # 18 tokens: three batches per forward; rank 1 of 2 with 5 batches has 2 (one forward), rank 0 3 (one)
    monkeypatch.setattr(hdata, "EVAL_TOKENS_PER_FORWARD", {"cpu": 18})
    model.seen.clear()
    LMEvaluation(cpu_run(seed=4, rank=1, world_size=2), Bins(), 2, 3, 5, ["fixed"])(model, 0)
    assert model.seen == [[d[1]] * 2 + [d[3]] * 2]


# --------------------------------------------------------------------------- finite datasets

class Noisy(torch.utils.data.Dataset):
    """Item i is (i, a draw of torch's global generator): the augmentation."""

    def __len__(self):
        return 5

    def __getitem__(self, i):
        if i < 0:
            raise IndexError(i)
        return i, float(torch.rand(()))


def test_seeded_items_draw_from_the_seed_and_restore_the_global_generator():
    items = _SeededItems(Noisy())
    assert len(items) == 5
    torch.manual_seed(0)
    expected_next = torch.rand(()).item()
    torch.manual_seed(0)
    a, b = items[(3, 11)], items[(3, 11)]
    assert a == b
    assert a == (3, float(torch.rand((), generator=torch.Generator().manual_seed(11)))) and items[(3, 12)] != a
    with pytest.raises(IndexError):
        items[(-1, 11)]
    assert torch.rand(()).item() == expected_next  # the global stream as if nothing had drawn


def test_epoch_batches_deal_each_epochs_permutation_over_ranks():
    ds = Noisy()
    one = EpochBatches(ds, 2, seed=3)
    assert (one.per_rank, one.steps_per_epoch) == (5, 3)
    epochs = [[i for b in one.epoch_batches(e) for i, _ in b] for e in range(4)]
    assert all(sorted(order) == [0, 1, 2, 3, 4] for order in epochs) and len({tuple(o) for o in epochs}) > 1
    assert [len(b) for b in one.epoch_batches(0)] == [2, 2, 1]
    assert epochs[0] == torch.randperm(5, generator=torch.Generator().manual_seed(derive_seed(3, 0))).tolist()
    assert one.epoch_batches(1)[0][0] == (epochs[1][0], derive_seed(3, 1, epochs[1][0]))
    # 2 ranks: 3 items each, the permutation wrapped to 6, every other item
    ranks = [EpochBatches(ds, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert (ranks[0].per_rank, ranks[0].steps_per_epoch) == (3, 2)
    for e in range(3):
        order = epochs[e] + epochs[e][:1]
        assert [[k for k, _ in b] for b in ranks[0].epoch_batches(e)] == [order[0:4:2], order[4:6:2]]
        assert [[k for k, _ in b] for b in ranks[1].epoch_batches(e)] == [order[1:4:2], order[5:6:2]]
        assert ranks[1].epoch_batches(e)[1][0] == (order[5], derive_seed(3, e, order[5]))
    # 4 ranks of 5 items: 2 each, 8 in all: the permutation and its first 3 again
    four = [EpochBatches(ds, 5, seed=3, rank=r, world_size=4).epoch_batches(0) for r in range(4)]
    assert [[k for k, _ in b[0]] for b in four] == [[(epochs[0] * 2)[r + 4 * j] for j in range(2)] for r in range(4)]
    assert EpochBatches(list(range(12)), 2, seed=3, world_size=5).per_rank == 3
    assert EpochBatches(ds, 2, seed=3).state_dict() == {}


def test_epoch_batches_resume_from_any_step_into_the_same_stream():
    one = EpochBatches(Noisy(), 2, seed=3)
    assert len(one.epoch_batches(0)) == 3  # (else the stream below has no batch and never ends)
    stream = [b for b in islice(one.batches(), 8)]  # 3 steps an epoch: two epochs and two steps
    for start in (0, 2, 3, 4, 6, 7):
        resumed = list(islice(EpochBatches(Noisy(), 2, seed=3).batches(start), 8 - start))
        assert [[(int(i), float(a)) for i, a in zip(*b)] for b in resumed] == \
               [[(int(i), float(a)) for i, a in zip(*b)] for b in stream[start:]], start
    # each item's augmentation is its (seed, epoch, index) draw
    i, a = stream[3]
    order = one.epoch_batches(1)[0]
    assert [int(k) for k in i] == [k for k, _ in order]
    assert [float(x) for x in a] == [float(torch.rand((), generator=torch.Generator().manual_seed(s))) for _, s in order]
    one.load_state_dict({})


def test_epoch_batches_give_the_loader_its_arguments_and_a_private_generator(monkeypatch):
    made = []

    class Loader:
        def __init__(self, items, batch_sampler, collate_fn, **kwargs):
            made.append((batch_sampler, collate_fn, kwargs))

        def __iter__(self):
            return iter([len(made)])  # one batch: which loader gave it

    monkeypatch.setattr(hdata, "DataLoader", Loader)
    collate = object()
    source = EpochBatches(Noisy(), 2, seed=3, rank=1, world_size=2, collate_fn=collate,
                          loader_kwargs={"num_workers": 2})
    assert list(islice(source.batches(3), 2)) == [1, 2]
    sampler, fn, kwargs = made[0]
    assert sampler == source.epoch_batches(1)[1:] and fn is collate and kwargs["num_workers"] == 2
    expected = torch.Generator().manual_seed(derive_seed(3, 1, 1)).initial_seed()
    assert kwargs["generator"].initial_seed() == expected
    assert made[1][0] == source.epoch_batches(2) and made[1][2]["generator"].initial_seed() == derive_seed(3, 2, 1)
    assert source.loader_kwargs == {"num_workers": 2}  # the generator goes to the loader only
    mine = torch.Generator()
    made.clear()
    next(EpochBatches(Noisy(), 2, seed=3, loader_kwargs={"generator": mine}).batches())
    assert made[0][2]["generator"] is mine


def test_eval_loader_gives_every_rank_as_many_batches_and_marks_the_padding():
    ds = list(range(10, 15))  # 5 items
    shard = eval_loader(cpu_run(), ds, 2)
    assert isinstance(shard, EvalShard) and len(shard) == 3
    assert [(b.tolist(), real) for b, real in shard] == [([10, 11], 2), ([12, 13], 2), ([14], 1)]
    # 2 ranks: rank 0 items 0, 2, 4; rank 1 items 1, 3 and 3 again, not counted
    assert [(b.tolist(), real) for b, real in eval_loader(cpu_run(rank=0, world_size=2), ds, 2)] == \
           [([10, 12], 2), ([14], 1)]
    assert [(b.tolist(), real) for b, real in eval_loader(cpu_run(rank=1, world_size=2), ds, 2)] == \
           [([11, 13], 2), ([13], 0)]
    # 4 ranks, batches of 1: rank 3 has item 3 and its own item again
    assert [(b.tolist(), real) for b, real in eval_loader(cpu_run(rank=3, world_size=4), ds, 1)] == \
           [([13], 1), ([13], 0)]
    # more ranks than items: a rank without any takes item 0, and counts none
    assert [(b.tolist(), real) for b, real in eval_loader(cpu_run(rank=1, world_size=2), [7], 4)] == [([7], 0)]


def test_eval_loader_passes_the_loaders_options_but_persistent_workers(monkeypatch):
    made = []
    monkeypatch.setattr(hdata, "DataLoader", lambda ds, batch_sampler, collate_fn, **kw: made.append(
        (batch_sampler, collate_fn, kw)) or [])
    collate = object()
    eval_loader(cpu_run(), list(range(3)), 2, collate_fn=collate, loader_kwargs={"num_workers": 2,
                                                                                  "persistent_workers": True})
    sampler, fn, kwargs = made[0]
    assert sampler == [[0, 1], [2]] and fn is collate and kwargs.pop("num_workers") == 2
    assert isinstance(kwargs.pop("generator"), torch.Generator) and kwargs == {}
    mine = torch.Generator()
    eval_loader(cpu_run(), list(range(3)), 2, loader_kwargs={"generator": mine})
    assert made[1][2]["generator"] is mine


def test_classification_evaluate_sums_loss_and_correct_over_the_real_items(monkeypatch):
    # batches of 2 items, 3 classes; the last batch's second item is padding
    # (each row's prediction is its own argmax: 0, 2 | 0 and padding; right, right | wrong)
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 2.0], [3.0, 0.0, 0.0], [1.0, 1.0, 5.0]])
    labels = torch.tensor([0, 2, 1, 2])
    shard = EvalShard([(logits[0:2], labels[0:2]), (logits[2:4], labels[2:4])], [2, 1])
    forward = lambda model, batch: (model(batch[0]), batch[1])
    [val, test] = classification_evaluate(cpu_run(), torch.nn.Identity(), {"val": shard, "test": shard}, forward)
    ce = lambda row, label: float(torch.logsumexp(logits[row], 0) - logits[row, label])  # -log softmax
    loss = (ce(0, 0) + ce(1, 2) + ce(2, 1)) / 3
    assert val == {"split": "val", "loss": pytest.approx(loss), "acc": pytest.approx(2 / 3)} and test["split"] == "test"
    # over 2 ranks: the sums (not the means) are all-reduced
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(torch.tensor([3.0, 0.0, 1.0], dtype=t.dtype)))
    [val] = classification_evaluate(cpu_run(world_size=2), torch.nn.Identity(), {"val": shard}, forward)
    assert val == {"split": "val", "loss": pytest.approx(loss * 3), "acc": 0.0}
    # float16 logits are summed in float32
    half = EvalShard([(torch.full((1, 2), 0.0, dtype=torch.float16), torch.tensor([0]))] * 2000, [1] * 2000)
    [val] = classification_evaluate(cpu_run(), torch.nn.Identity(), {"val": half}, forward)
    assert val["loss"] == pytest.approx(np.log(2), rel=1e-6)
