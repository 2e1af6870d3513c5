"""Data sets as tensors on the run's device (protocol sections 1-3).

The whole data set is loaded once, normalised once (per-channel mean/std of the training set, unless
``data.normalise=none``) and kept on the device; batches are index slices of a shuffled order,
augmentation (off by default: the paper uses none) is batched tensor ops. Files are read in their
published on-disk formats by the readers below — CIFAR-10's pickled batches, MNIST's IDX files (gzipped
or not) — and torchvision is used only to download them. Missing files never fall back to anything:
they raise :class:`DatasetNotFoundError`, which says which data set, where it looked and how to fix it;
files that are there but cannot be read (a download cut short, another file under the same name) raise
:class:`DatasetUnreadableError`, naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import pickle
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bnopt.seeding import derived_seed

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DatasetNotFoundError(RuntimeError):
    """The files of a data set are not where the config says, and could not be downloaded."""


class DatasetUnreadableError(RuntimeError):
    """A data set's file is where the config says but cannot be read: truncated, corrupt or of another format."""


@contextlib.contextmanager
def reading(title: str, path: Path, fix: str):
    """Turn the ways a damaged file fails to read (gzip, zlib, pickle, the format checks) into one error
    that names the data set, the file and the fix."""
    try:
        yield
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, KeyError, TypeError) as err:
        raise DatasetUnreadableError(f"{title}: cannot read {path} ({type(err).__name__}: {err}). Fix: {fix}") from err


@dataclass
class TensorData:
    """A data set held as tensors. ``test_x`` is None where the task has no test set (the DLN)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    num_classes: int | None  # None: regression
    loss_fn: LossFn
    # A black pixel's value per channel in these (normalised) units: what a random crop pads with, as
    # torchvision's RandomCrop before Normalize does. None for data that are not images.
    black: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def is_classification(self) -> bool:
        return self.num_classes is not None

    def to(self, device: torch.device) -> "TensorData":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return TensorData(self.name, move(self.train_x), move(self.train_y), move(self.test_x),
                          move(self.test_y), self.num_classes, self.loss_fn, move(self.black))


def sum_squared_loss(scale: float) -> LossFn:
    """``scale * sum((out - y)^2)`` over samples and outputs (TensorFlow's l2_loss for scale 0.5)."""

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return scale * (out - target).pow(2).sum()

    return loss


# ----------------------------------------------------------------------------------------------------
# On-disk formats


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not: magic (0, 0, dtype, ndim), big-endian
    uint32 dimensions, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError("not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(dims))
    if data.size != expected:
        shape = " x ".join(map(str, dims.tolist()))
        what = "truncated" if data.size < expected else f"{data.size - expected} bytes too long"
        raise ValueError(f"{what}: its header says {shape} bytes of data, it holds {data.size}")
    return data.reshape(tuple(dims)).copy()  # frombuffer is read-only


MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def idx_files_present(directory: Path) -> dict[str, Path]:
    """Those of the four MNIST-format files that are in ``directory`` (each ``.gz`` or not)."""
    found = {}
    for key, stem in MNIST_FILES.items():
        path = next((c for c in (directory / stem, directory / f"{stem}.gz") if c.is_file()), None)
        if path is not None:
            found[key] = path
    return found


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four MNIST-format files in ``directory`` (each ``.gz`` or not), or None if any is missing."""
    found = idx_files_present(directory)
    return found if len(found) == len(MNIST_FILES) else None


CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_BATCH = "test_batch"


def read_cifar_batches(folder: Path, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels from CIFAR-10's pickled python batches."""
    images, labels = [], []
    for name in names:
        with reading("CIFAR-10", folder / name, f"delete {folder} and run again with data.download=true (which "
                                                "checks the archive and extracts it afresh), or extract "
                                                "cifar-10-python.tar.gz again"):
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
            if len(images[-1]) != len(labels[-1]):
                raise ValueError(f"{len(images[-1])} images but {len(labels[-1])} labels")
    return np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------------------------------------------
# Data sets

MNIST_FORMAT = {
    # name: (human name, torchvision class name, which is also the folder torchvision downloads into)
    "mnist": ("MNIST", "MNIST"),
    "fashion_mnist": ("Fashion-MNIST", "FashionMNIST"),
}


def _download(torchvision_class: str, root: Path, title: str, looked: str) -> None:
    import torchvision.datasets

    try:
        # One download per root at a time: the jobs of a parallel sweep find the data missing all at once, and
        # two torchvision downloads into one folder write over each other's archive. The job that waited
        # finds the files there (torchvision checks before it downloads).
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".download.lock", "ab") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as err:  # a file system without locks (some cluster mounts): download unguarded
                print(f"warning: cannot lock {lock.name} ({err.strerror}); jobs that download at once may write "
                      "over each other's files", file=sys.stderr)
            getattr(torchvision.datasets, torchvision_class)(str(root), train=True, download=True)
    except Exception as err:  # offline, proxy, checksum: all end the same way for the user
        reason = " ".join(str(err).split())[:300]  # torchvision's message spans lines; ours is one
        raise DatasetNotFoundError(
            f"{title} not found in {looked}, and downloading it into {root} failed ({type(err).__name__}: "
            f"{reason}). Fix: run once with internet access and data.download=true, or place the files as "
            f"described in the README and set data.root to their directory."
        ) from err


# MNIST and Fashion-MNIST use the same four file names, so with one data.root for both (the default) a
# directory of one must not pass for the other. Their official releases tell apart by the training labels:
# 60,000 of them, beginning with these. The test labels (10,000) begin with these, which tells a directory
# that mixes one release's training files with other test files.
OFFICIAL_TRAIN_LABELS = {"mnist": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4), "fashion_mnist": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5)}
OFFICIAL_TEST_LABELS = {"mnist": (7, 2, 1, 0, 4, 1, 4, 9, 5, 9), "fashion_mnist": (9, 2, 1, 1, 6, 1, 4, 6, 5, 7)}


def official_release(files: dict[str, Path]) -> str | None:
    """Which official release ("mnist" or "fashion_mnist") these IDX files are, told by their training labels;
    None for any other files, and for labels that cannot be read (reading them in earnest says why)."""
    try:
        labels = read_idx(files["train_y"])
    except (OSError, EOFError, zlib.error, ValueError):
        return None
    start = tuple(labels[:10].tolist()) if labels.shape == (60000,) else None
    return next((name for name, first in OFFICIAL_TRAIN_LABELS.items() if start == first), None)


def load_mnist_format(name: str, root: Path, download: bool, search_paths: Sequence[str] = ()) -> dict:
    """MNIST or Fashion-MNIST as uint8 arrays. Looks for the four IDX files directly in ``root`` (how
    Debian's dataset-fashion-mnist lays them out), in torchvision's ``root/<Class>/raw``, then in
    ``search_paths``; downloads into ``root`` with torchvision if allowed."""
    title, tv_class = MNIST_FORMAT[name]
    directories = [root, root / tv_class / "raw", *map(Path, search_paths)]
    found_in = files = None
    other_data_sets = []  # directories holding the other data set's official files, passed over
    for directory in directories:
        candidate = find_idx_files(directory)
        release = None if candidate is None else official_release(candidate)
        if release not in (None, name):
            other_data_sets.append(f"{directory} holds {MNIST_FORMAT[release][0]}, not {title}")
        elif candidate is not None:
            found_in, files = directory, candidate
            break
    incomplete = [f"{d} lacks {', '.join(MNIST_FILES[k] for k in MNIST_FILES if k not in present)}"
                  for d in directories if 0 < len(present := idx_files_present(d)) < len(MNIST_FILES)]
    looked = ", ".join(str(d) for d in directories) + "".join(f" ({note})" for note in other_data_sets + incomplete)
    if files is None and download:
        _download(tv_class, root, title, looked)
        found_in, files = root / tv_class / "raw", find_idx_files(root / tv_class / "raw")
    if files is None:
        raise DatasetNotFoundError(
            f"{title} not found: looked for the four IDX files ({', '.join(MNIST_FILES.values())}, "
            f"each optionally .gz) in {looked}, and data.download=false. Fix: set data.download=true "
            f"(needs internet), or copy the files into one of those directories, or point data.root at "
            f"the directory that holds them"
            + (" (on Debian/Ubuntu: apt-get install dataset-fashion-mnist puts them in "
               "/usr/share/datasets/fashion-mnist)." if name == "fashion_mnist" else ".")
        )
    if found_in in directories[2:]:
        # A search path is someone else's copy (Debian's package, a shared directory): not ours to delete.
        fix = (f"fetch a fresh copy into data.root ({root}) with data.search_paths=[] data.download=true, or "
               f"repair the copy in {found_in}"
               + (" (apt-get install --reinstall dataset-fashion-mnist)" if name == "fashion_mnist" else ""))
    else:
        fix = ("delete the files and run again with data.download=true to fetch them afresh, or replace them with "
               "the official files")
    arrays = {}
    for key, path in files.items():
        with reading(title, path, fix):
            arrays[key] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DatasetUnreadableError(
                f"{title}: {files[f'{split}_x']} holds an array of shape {images.shape} and {files[f'{split}_y']} "
                f"one of shape {labels.shape}, not images (N, height, width) and labels (N,). Fix: {fix}")
        if len(images) != len(labels):
            raise DatasetUnreadableError(f"{title}: {files[f'{split}_x']} holds {len(images)} images but "
                                         f"{files[f'{split}_y']} holds {len(labels)} labels. Fix: {fix}")
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DatasetUnreadableError(
            f"{title}: the training images ({files['train_x']}) are {arrays['train_x'].shape[1:]} pixels, the test "
            f"images ({files['test_x']}) {arrays['test_x'].shape[1:]}: they are not one data set's. Fix: {fix}")
    test_start = tuple(arrays["test_y"][:10].tolist()) if arrays["test_y"].shape == (10000,) else None
    if official_release(files) == name and test_start != OFFICIAL_TEST_LABELS[name]:
        raise DatasetUnreadableError(
            f"{title}: the training files in {found_in} are the official release, but {files['test_y']} holds "
            f"other test labels than the official ones: the test files come from another copy. Fix: {fix}")
    return {k: v[:, None] if k.endswith("_x") else v for k, v in arrays.items()}  # images get a channel axis


def load_cifar10(root: Path, download: bool) -> dict:
    """CIFAR-10 as uint8 arrays from ``root/cifar-10-batches-py`` (the extracted official archive)."""
    folder = root / CIFAR_FOLDER
    needed = [*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH]

    def missing() -> list[str]:
        return [n for n in needed if not (folder / n).is_file()]

    if missing() and download:
        _download("CIFAR10", root, "CIFAR-10", str(folder))
    if missing():
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing())}, and data.download=false. Fix: set "
            f"data.download=true (needs internet), or extract cifar-10-python.tar.gz into {root}, or "
            f"point data.root at the directory that contains {CIFAR_FOLDER}/."
        )
    train_x, train_y = read_cifar_batches(folder, CIFAR_TRAIN_BATCHES)
    test_x, test_y = read_cifar_batches(folder, [CIFAR_TEST_BATCH])
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)


def gaussian_regression(n_samples: int, dim: int, seed: int, x_std: float = 1.0,
                        a_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Protocol section 2: x ~ N(0, x_std^2 I_dim), A with i.i.d. N(0, a_std^2) entries, y = A x; fixed by
    ``seed``. Drawn from a stream derived from the seed: the global stream seeded with the run seed
    initialises the model, and the same stream here would build inputs out of the very numbers behind the
    initial weights. The standard deviations scale the same draws (a factor 1 changes no bit)."""
    gen = torch.Generator().manual_seed(derived_seed("gaussian_regression", seed))
    a = torch.randn(dim, dim, generator=gen) * a_std
    x = torch.randn(n_samples, dim, generator=gen) * x_std
    return x, x @ a.T


INPUT_NORMALISATIONS = ("per_channel", "none")


def channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's mean and (population) standard deviation of uint8 images (N, C, H, W), in float64 and
    scaled to [0, 1]: from the counts of the 256 pixel values, so without a float64 copy of the data set
    (bincount takes its input as int64, hence blocks of about 2**18 pixels)."""
    mean, std = [], []
    values = np.arange(256, dtype=np.float64) / 255
    block = max(1, 2**18 // int(np.prod(images.shape[2:])))  # images
    for c in range(images.shape[1]):
        counts = np.zeros(256)
        for i in range(0, len(images), block):
            counts += np.bincount(images[i : i + block, c].ravel(), minlength=256)
        m = counts @ values / counts.sum()
        mean.append(m)
        std.append(np.sqrt(counts @ (values - m) ** 2 / counts.sum()))
    return np.array(mean), np.array(std)


def standardise(train: np.ndarray, *others: np.ndarray,
                normalise: str = "per_channel") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Scale uint8 images to [0, 1] and, with ``normalise="per_channel"``, normalise each channel by the
    training set's mean and std. Also returns a black pixel's value per channel in the same units."""
    if normalise not in INPUT_NORMALISATIONS:
        raise ValueError(f"normalise must be one of {INPUT_NORMALISATIONS}; got {normalise!r}")
    if normalise == "none":
        return [torch.from_numpy(a).float().div_(255) for a in (train, *others)], torch.zeros(train.shape[1])
    mean, std = (torch.from_numpy(s).float().view(1, -1, 1, 1) for s in channel_statistics(train))
    return [(torch.from_numpy(a).float().div_(255) - mean) / std for a in (train, *others)], (-mean / std).view(-1)


def load_data(cfg, seed: int) -> TensorData:
    """Build the data set named by ``cfg`` (a ``data/*.yaml`` config) as CPU tensors."""
    if cfg.name == "gaussian_regression":
        x, y = gaussian_regression(cfg.n_samples, cfg.dim, seed if cfg.seed is None else cfg.seed,
                                   x_std=cfg.x_std, a_std=cfg.a_std)
        return TensorData(cfg.name, x, y, None, None, None, sum_squared_loss(cfg.loss_scale))
    root = Path(cfg.root).expanduser()
    if cfg.name == "cifar10":
        arrays = load_cifar10(root, cfg.download)
    elif cfg.name in MNIST_FORMAT:
        arrays = load_mnist_format(cfg.name, root, cfg.download, cfg.get("search_paths") or ())
    else:
        raise ValueError(f"unknown data set {cfg.name!r}")
    title = "CIFAR-10" if cfg.name == "cifar10" else MNIST_FORMAT[cfg.name][0]
    for split in ("train", "test"):
        labels = arrays[f"{split}_y"]
        if not labels.size:
            raise DatasetUnreadableError(f"{title}: its {split} split holds no samples. Fix: use the official files")
        if not 0 <= labels.min() <= labels.max() < cfg.num_classes:
            raise DatasetUnreadableError(
                f"{title}: its {split} labels range from {labels.min()} to {labels.max()}, but data.num_classes="
                f"{cfg.num_classes} admits 0 to {cfg.num_classes - 1}. Fix: set data.num_classes, or use the "
                f"official files")
    (train_x, test_x), black = standardise(arrays["train_x"], arrays["test_x"], normalise=cfg.normalise)
    train_y = torch.from_numpy(arrays["train_y"].astype(np.int64))
    test_y = torch.from_numpy(arrays["test_y"].astype(np.int64))
    # Subsets (scale=smoke) take the first samples, after normalising with the full set's statistics.
    train_x, train_y = train_x[: cfg.max_train_samples], train_y[: cfg.max_train_samples]
    test_x, test_y = test_x[: cfg.max_test_samples], test_y[: cfg.max_test_samples]
    return TensorData(cfg.name, train_x, train_y, test_x, test_y, cfg.num_classes, F.cross_entropy, black)


# ----------------------------------------------------------------------------------------------------
# Batches


class BatchStream:
    """Endless mini-batches without replacement, reshuffled every epoch (the incomplete last batch of an
    epoch is dropped). A full batch is the data set itself, unshuffled. Order and augmentation draw from
    generators of their own, so the global random state plays no part and a checkpoint can restore them
    (``state_dict``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, augment: bool = False,
                 crop_padding: int = 4, pad_value: torch.Tensor | None = None, channels_last: bool = False):
        if not 1 <= batch_size <= len(x):
            raise ValueError(f"batch size {batch_size} must be between 1 and the data set size {len(x)}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.augment, self.crop_padding, self.channels_last = augment, crop_padding, channels_last
        # per channel (TensorData.black for a black border); zeros by default
        self.pad_value = torch.zeros(x.shape[1], device=x.device) if pad_value is None else pad_value.to(x)
        # Shuffling draws once per epoch on the CPU; augmentation per batch on the data's device, so
        # that a GPU run makes no host round-trip per step. The augmentation stream is derived from the
        # seed: seeded with seed + 1 it was the next seed's model initialisation and shuffling. (The order
        # stream still starts as the run's global stream does; deriving it changes every committed run.)
        self.order_generator = torch.Generator().manual_seed(seed)
        self.augment_generator = torch.Generator(device=x.device).manual_seed(derived_seed(seed, "augment"))
        self.order: torch.Tensor | None = None
        self.position = 0

    @property
    def full_batch(self) -> bool:
        return self.batch_size == len(self.x)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.full_batch:
            x, y = self.x, self.y
        else:
            if self.order is None or self.position + self.batch_size > len(self.x):
                self.order = torch.randperm(len(self.x), generator=self.order_generator).to(self.x.device)
                self.position = 0
            index = self.order[self.position : self.position + self.batch_size]
            self.position += self.batch_size
            x, y = self.x.index_select(0, index), self.y.index_select(0, index)  # 3-4x faster than x[index]
        if self.augment:
            x = self.crop_and_flip(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def crop_and_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop after padding by ``crop_padding`` with ``pad_value`` and random horizontal flip, per image."""
        n, c, h, w = x.shape
        pad, gen, dev = self.crop_padding, self.augment_generator, x.device
        padded = self.pad_value.view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
        padded[:, :, pad : pad + h, pad : pad + w] = x
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        images = torch.arange(n, device=dev)[:, None, None, None]
        channels = torch.arange(c, device=dev)[None, :, None, None]
        cropped = padded[images, channels, rows, cols]
        flip = torch.rand(n, generator=gen, device=dev) < 0.5
        return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)

    def state_dict(self) -> dict:
        return {
            "order_generator": self.order_generator.get_state(),
            "augment_generator": self.augment_generator.get_state(),
            "augment_device": self.augment_generator.device.type,
            "order": None if self.order is None else self.order.cpu(),
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue a stream saved on another device too (a run moved between CPU and GPU), unless it
        augments: a CPU generator's draws cannot continue on a GPU, nor the other way."""
        here = self.augment_generator.device.type
        saved = state.get("augment_device", here)  # checkpoints before this key resumed on their own device
        if saved == here:
            self.augment_generator.set_state(state["augment_generator"])
        elif self.augment:
            raise ValueError(f"its augmentation draws were made on {saved} and cannot continue on {here}")
        self.order_generator.set_state(state["order_generator"])
        self.order = None if state["order"] is None else state["order"].to(self.x.device)
        self.position = state["position"]
