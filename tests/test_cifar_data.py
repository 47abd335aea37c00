"""CIFAR-10 data (harness.cifar10) on a generated miniature CIFAR-10, and the two image models."""
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, random_split
from torchvision import transforms

import harness.cifar10
from cifar.model import resnet18
from harness.errors import UsageError
from tests.cifar_fixture import LABEL_NAMES, UncheckedCIFAR10, make_fake_cifar10, read_raw
from harness.cifar10 import MEAN, STD, cifar10_splits, loader_kwargs, train_val_indices, val_size
from vit.model import build_vit

N_TRAIN, N_TEST = 300, 60


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return make_fake_cifar10(tmp_path_factory.mktemp("cifar"), n_train=N_TRAIN, n_test=N_TEST, seed=3)


@pytest.fixture
def splits(fake_root, monkeypatch):
    monkeypatch.setattr(harness.cifar10, "DATASET_CLASS", UncheckedCIFAR10)
    return cifar10_splits(fake_root)


def normalized(image_hwc_uint8):
    """The expected eval tensor of a raw image, computed without torchvision."""
    x = torch.from_numpy(image_hwc_uint8.astype(np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def test_fixture_writes_the_official_pickle_format(fake_root):
    folder = fake_root / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch", "batches.meta"]
    )
    with open(folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the dataset page's recipe
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (N_TRAIN // 5, 3072)
    assert len(batch[b"labels"]) == N_TRAIN // 5 and all(0 <= y < 10 for y in batch[b"labels"])
    with open(folder / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="bytes")[b"label_names"][:2] == [b"airplane", b"automobile"]
    # The real torchvision class (md5 checks aside) parses it.
    ds = UncheckedCIFAR10(fake_root, train=True)
    assert len(ds) == N_TRAIN and ds.classes == LABEL_NAMES
    assert len(UncheckedCIFAR10(fake_root, train=False)) == N_TEST
    # The real class, with checksums, refuses generated files.
    with pytest.raises(RuntimeError):
        harness.cifar10.CIFAR10(fake_root, train=True)


def test_split_sizes_and_items(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 270, "val": 30, "test": N_TEST}
    for name, ds in splits.items():
        image, label = ds[0]
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32), name
        assert type(label) is int and 0 <= label < 10, name
    assert val_size(50_000) == 5_000
    train, val = train_val_indices(50_000)
    assert (len(train), len(val)) == (45_000, 5_000)


def test_split_is_fixed_disjoint_complete_and_matches_random_split(fake_root):
    torch.manual_seed(0)
    first = cifar10_splits(fake_root, dataset_cls=UncheckedCIFAR10)
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    second = cifar10_splits(fake_root, dataset_cls=UncheckedCIFAR10)
    assert torch.equal(torch.get_rng_state(), state)  # the global (run-seed) RNG is untouched
    for name in ("train", "val", "test"):
        assert first[name].indices == second[name].indices
    train, val = set(first["train"].indices), set(first["val"].indices)
    assert not train & val and train | val == set(range(N_TRAIN))
    assert first["test"].indices == list(range(N_TEST))
    # The same indices the released code's random_split(..., manual_seed(42)) gives.
    ref_train, ref_val = random_split(range(N_TRAIN), [270, 30], generator=torch.Generator().manual_seed(42))
    assert first["train"].indices == list(ref_train) and first["val"].indices == list(ref_val)
    assert first["train"].indices != sorted(first["train"].indices)  # a permutation, not a prefix


def test_eval_splits_are_never_augmented(splits, fake_root):
    test_raw, test_labels = read_raw(fake_root, train=False)
    train_raw, train_labels = read_raw(fake_root, train=True)
    for i in range(5):
        torch.manual_seed(i)
        image, label = splits["test"][i]
        torch.manual_seed(100 + i)
        again, _ = splits["test"][i]
        assert torch.equal(image, again)
        torch.testing.assert_close(image, normalized(test_raw[i]), rtol=0, atol=1e-5)
        assert label == test_labels[i]
        j = splits["val"].indices[i]
        image, label = splits["val"][i]
        torch.testing.assert_close(image, normalized(train_raw[j]), rtol=0, atol=1e-5)
        assert torch.equal(image, splits["val"][i][0]) and label == train_labels[j]


def test_train_images_are_augmented_from_the_global_rng(splits, fake_root):
    train_raw, train_labels = read_raw(fake_root, train=True)
    j = splits["train"].indices[0]
    draws = []
    for seed in range(8):
        torch.manual_seed(seed)
        image, label = splits["train"][0]
        assert label == train_labels[j]
        draws.append(image)
    assert len({d.numpy().tobytes() for d in draws}) > 1
    # Every draw is a (possibly flipped) 32x32 window of the zero-padded image: the
    # unpadded pixels it shows come from the raw image.
    plain = normalized(train_raw[j])
    for d in draws:
        matches = [
            torch.allclose(
                candidate[:, max(0, -dy) : 32 - max(0, dy), max(0, -dx) : 32 - max(0, dx)],
                plain[:, max(0, dy) : 32 + min(0, dy), max(0, dx) : 32 + min(0, dx)],
                rtol=0,
                atol=1e-5,
            )
            for candidate in (d, d.flip(-1))
            for dy in range(-4, 5)
            for dx in range(-4, 5)
        ]
        assert any(matches)
    # Seeding torch around __getitem__ reproduces the crop and flip.
    torch.manual_seed(5)
    assert torch.equal(splits["train"][0][0], draws[5])


def test_transforms_and_normalisation_constants(splits):
    assert MEAN == (0.4914, 0.4822, 0.4465) and STD == (0.2023, 0.1994, 0.2010)
    kinds = [type(t) for t in splits["train"].transform.transforms]
    assert kinds == [transforms.RandomCrop, transforms.RandomHorizontalFlip, transforms.ToTensor, transforms.Normalize]
    crop = splits["train"].transform.transforms[0]
    assert crop.size == (32, 32) and crop.padding == 4
    for name in ("val", "test"):
        kinds = [type(t) for t in splits[name].transform.transforms]
        assert kinds == [transforms.ToTensor, transforms.Normalize]
    for ds in splits.values():
        norm = ds.transform.transforms[-1]
        assert tuple(norm.mean) == MEAN and tuple(norm.std) == STD


def test_missing_dataset_names_the_download_option(tmp_path):
    with pytest.raises(UsageError, match=r"--set data\.download=true") as err:
        cifar10_splits(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "\n" not in str(err.value)
    # A partial copy is missing too.
    root = make_fake_cifar10(tmp_path / "partial", n_train=20, n_test=10)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UsageError, match="data_batch_3"):
        cifar10_splits(root, dataset_cls=UncheckedCIFAR10)


def test_corrupted_dataset_is_a_usage_error(fake_root):
    # The real class md5-checks the generated (non-official) files and fails.
    with pytest.raises(UsageError, match="corrupted.*data.download=true"):
        cifar10_splits(fake_root)


def test_loader_kwargs(splits):
    assert loader_kwargs("cpu") == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    cuda = loader_kwargs(torch.device("cuda", 0))
    assert 1 <= cuda["num_workers"] <= 4 and cuda["pin_memory"] and cuda["persistent_workers"]
    images, labels = next(iter(DataLoader(splits["train"], batch_size=16, **loader_kwargs("cpu"))))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_vit_tiny_parameters_and_forward():
    torch.manual_seed(0)
    model = build_vit()
    # 9 blocks x 444,864 + patch embed 9,408 + cls 192 + pos 12,480 + norm 384 + head 1,930
    assert n_params(model) == 4_028_170
    assert abs(n_params(model) - 4.0e6) < 0.05e6
    assert model.patch_embed.num_patches == 64 and len(model.blocks) == 9
    assert model.blocks[0].attn.num_heads == 3 and model.embed_dim == 192
    assert model.head_drop.p == 0.1
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_resnet18_parameters_and_forward():
    torch.manual_seed(0)
    model = resnet18()
    assert n_params(model) == 11_173_962
    assert abs(n_params(model) - 11.2e6) < 0.05e6
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] == [2, 2, 2, 2]
    x = torch.randn(4, 3, 32, 32)
    out = model(x)  # train mode: BatchNorm uses batch statistics
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert resnet18(num_classes=3).linear.out_features == 3


def test_computed_normalisation_is_the_release_statistics(fake_root, monkeypatch):
    """``normalize="computed"``: the released cifar code's get_mean_std, redone here the release's
    way (ToTensor on every training image, then numpy's per-channel mean and std), over all the
    official training images, validation images included; the test images use the same numbers."""
    monkeypatch.setattr(harness.cifar10, "DATASET_CLASS", UncheckedCIFAR10)
    raw = read_raw(fake_root, train=True)[0]  # (N, 32, 32, 3) uint8
    imgs = np.stack([transforms.ToTensor()(image).numpy() for image in raw])
    mean = [imgs[:, c].mean() for c in range(3)]
    std = [imgs[:, c].std() for c in range(3)]
    splits = cifar10_splits(fake_root, normalize="computed")
    for ds in splits.values():
        norm = ds.transform.transforms[-1]
        np.testing.assert_allclose(norm.mean, mean, rtol=1e-5)
        np.testing.assert_allclose(norm.std, std, rtol=1e-5)
    assert max(abs(a - b) for a, b in zip(std, STD)) > 0.01  # the fixed constants are another choice
    with pytest.raises(UsageError, match="data.normalize must be one of fixed, computed, got 'mean'"):
        cifar10_splits(fake_root, normalize="mean")


def test_cifar_follows_the_release_normalisation_and_vit_keeps_its_constants():
    from harness.config import read_yaml
    assert read_yaml("cifar/configs/paper.yaml")["data"]["normalize"] == "computed"
    assert read_yaml("vit/configs/paper.yaml")["data"]["normalize"] == "fixed"
