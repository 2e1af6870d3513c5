"""Synthetic data sets written in the published on-disk formats — CIFAR-10's pickled python batches and
MNIST's IDX files (gzipped or not) — so that tests and benchmarks exercise the real loaders offline.
Never used by a training run unless its ``data.root`` points at them on purpose."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, gzipped: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gzipped:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def labelled_images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose mean brightness encodes the label, so a network can learn something from them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    noise = rng.integers(0, 60, (n, *shape))
    images = np.clip(noise + labels.reshape(-1, *[1] * len(shape)) * 20, 0, 255).astype(np.uint8)
    return images, labels


def write_mnist(directory: Path, n_train: int = 300, n_test: int = 100, gzipped: bool = True) -> Path:
    """The four MNIST IDX files, directly in ``directory`` (Debian's layout)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = labelled_images(n, (28, 28), seed)
        write_idx(directory / f"{split}-images-idx3-ubyte", images, gzipped)
        write_idx(directory / f"{split}-labels-idx1-ubyte", labels, gzipped)
    return directory


def write_cifar10(root: Path, per_batch: int = 60, n_test: int = 100) -> Path:
    """``root/cifar-10-batches-py`` with five training batches and a test batch (python pickles)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [(f"data_batch_{i}", per_batch, i) for i in range(1, 6)] + [("test_batch", n_test, 9)]
    for name, n, seed in batches:
        images, labels = labelled_images(n, (3, 32, 32), seed)
        batch = {"batch_label": name, "labels": labels.tolist(), "data": images.reshape(n, -1),
                 "filenames": [f"{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f, protocol=2)
    return root
