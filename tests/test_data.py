"""Data loading from the real on-disk formats, clear errors when files are missing or damaged, tensor batching."""

import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bnopt.data import (
    OFFICIAL_TEST_LABELS, OFFICIAL_TRAIN_LABELS, BatchStream, DatasetNotFoundError, DatasetUnreadableError, find_idx_files, gaussian_regression,
    channel_statistics, load_cifar10, load_data, load_mnist_format, official_release, read_idx,
)
from bnopt.seeding import derived_seed
from bnopt.synthetic import labelled_images, write_cifar10, write_idx, write_mnist
from conftest import check_added_keys_as_train_does, compose_config


def data_cfg(name, root, **extra):
    base = dict(name=name, root=str(root), download=False, augment=False, normalise="per_channel", num_classes=10,
                max_train_samples=None, max_test_samples=None, search_paths=[])
    return OmegaConf.create({**base, **extra})


@pytest.mark.parametrize("gzipped", [True, False])
def test_idx_files_round_trip(tmp_path, gzipped):
    images, _ = labelled_images(5, (28, 28), seed=0)
    path = write_idx(tmp_path / "images", images, gzipped)
    assert np.array_equal(read_idx(path), images)


def _cut_short(path):
    path.write_bytes(path.read_bytes()[:-10])


def _declare_float32_elements(path):
    """Byte 2 of the magic number is the element type. Only 0x08 (unsigned byte, what MNIST's files hold) is
    read; values of any other type (here 0x0D, float32) would be misread as bytes."""
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D
    path.write_bytes(bytes(raw))


def _append_bytes(path):
    path.write_bytes(path.read_bytes() + b"12345")


@pytest.mark.parametrize("damage, reason", [(_cut_short, "truncated"), (_append_bytes, "5 bytes too long"),
                                            (_declare_float32_elements, "not an unsigned-byte IDX file")])
def test_a_damaged_idx_file_is_refused(tmp_path, damage, reason):
    images, _ = labelled_images(5, (28, 28), seed=0)
    path = write_idx(tmp_path / "images", images, gzipped=False)
    damage(path)
    with pytest.raises(ValueError, match=reason):
        read_idx(path)


def _replace_with_a_web_page(path):
    path.write_bytes(b"<html><body>Service unavailable</body></html>")


@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("damage", [_cut_short, _replace_with_a_web_page])
def test_damaged_mnist_file_names_the_data_set_the_file_and_the_fix(tmp_path, gzipped, damage):
    write_mnist(tmp_path, n_train=30, n_test=20, gzipped=gzipped)
    damaged = tmp_path / ("t10k-labels-idx1-ubyte" + (".gz" if gzipped else ""))
    damage(damaged)
    with pytest.raises(DatasetUnreadableError) as err:
        load_mnist_format("fashion_mnist", tmp_path, download=False)
    message = str(err.value)
    assert message.startswith(f"Fashion-MNIST: cannot read {damaged} (")
    assert message.endswith("Fix: delete the files and run again with data.download=true to fetch them afresh, "
                            "or replace them with the official files")


@pytest.mark.parametrize("name, package_hint", [("fashion_mnist", True), ("mnist", False)])
def test_damaged_file_in_a_search_path_is_not_ours_to_delete(tmp_path, name, package_hint):
    """A copy found in a search path (Debian's package directory) gets advice that leaves it alone: fetch
    a fresh copy into data.root instead, or repair the package."""
    shared = tmp_path / "usr-share"
    write_mnist(shared, n_train=30, n_test=20, gzipped=True)
    _cut_short(shared / "train-images-idx3-ubyte.gz")
    root = tmp_path / "data"
    with pytest.raises(DatasetUnreadableError) as err:
        load_mnist_format(name, root, download=False, search_paths=[str(shared)])
    message = str(err.value)
    assert f"into data.root ({root}) with data.search_paths=[] data.download=true" in message
    assert f"repair the copy in {shared}" in message and "delete" not in message
    assert ("apt-get install --reinstall dataset-fashion-mnist" in message) == package_hint


def test_mnist_images_and_labels_of_different_sizes_are_refused(tmp_path):
    write_mnist(tmp_path, n_train=30, n_test=20, gzipped=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labelled_images(29, (28, 28), seed=0)[1], gzipped=False)
    with pytest.raises(DatasetUnreadableError, match="MNIST: .*train-images-idx3-ubyte holds 30 images but "
                                                     ".*train-labels-idx1-ubyte holds 29 labels"):
        load_mnist_format("mnist", tmp_path, download=False)


def test_mnist_files_that_are_not_one_data_sets_images_and_labels_are_refused(tmp_path):
    """Files of the right names with other contents: test images of another size, or of another rank."""
    write_mnist(tmp_path, n_train=30, n_test=20, gzipped=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", labelled_images(20, (32, 32), seed=0)[0], gzipped=False)
    with pytest.raises(DatasetUnreadableError, match=r"MNIST: the training images .* are \(28, 28\) pixels, the "
                                                     r"test images .* \(32, 32\): they are not one data set's"):
        load_mnist_format("mnist", tmp_path, download=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", labelled_images(20, (3, 32, 32), seed=0)[0], gzipped=False)
    with pytest.raises(DatasetUnreadableError, match=r"t10k-images-idx3-ubyte holds an array of shape "
                                                     r"\(20, 3, 32, 32\) .* not images \(N, height, width\)"):
        load_mnist_format("mnist", tmp_path, download=False)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_an_official_training_set_beside_other_test_files_is_refused(tmp_path, name):
    """One release's training files next to another copy's test files would score the model on other data."""
    write_official_lookalike(tmp_path / "data", name, test_labels=np.arange(10000, dtype=np.uint8) % 10)
    with pytest.raises(DatasetUnreadableError, match="are the official release, but .*t10k-labels-idx1-ubyte.gz "
                                                     "holds other test labels than the official ones"):
        load_mnist_format(name, tmp_path / "data", download=False)
    assert load_mnist_format(name, write_mnist(tmp_path / "own"), download=False)  # not a release: not checked


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_labels_beyond_the_number_of_classes_are_refused(tmp_path, name, cifar_root, mnist_root):
    root = cifar_root if name == "cifar10" else mnist_root
    title = "CIFAR-10" if name == "cifar10" else "MNIST"
    with pytest.raises(DatasetUnreadableError, match=f"{title}: its train labels range from 0 to 9, but "
                                                     "data.num_classes=9 admits 0 to 8"):
        load_data(data_cfg(name, root, num_classes=9), seed=0)
    assert load_data(data_cfg(name, root, num_classes=10), seed=0).num_classes == 10


def test_a_split_without_samples_is_refused(tmp_path):
    write_mnist(tmp_path, n_train=30, n_test=20)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8), gzipped=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(0, np.uint8), gzipped=True)
    with pytest.raises(DatasetUnreadableError, match="MNIST: its train split holds no samples"):
        load_data(data_cfg("mnist", tmp_path), seed=0)


def test_missing_mnist_file_is_named_with_its_directory(tmp_path):
    write_mnist(tmp_path, n_train=30, n_test=20)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"\\({tmp_path} lacks t10k-labels-idx1-ubyte\\)"):
        load_mnist_format("mnist", tmp_path, download=False)


@pytest.mark.parametrize("gzipped", [True, False])
def test_mnist_format_files_directly_in_root(tmp_path, gzipped):
    write_mnist(tmp_path, n_train=30, n_test=20, gzipped=gzipped)
    arrays = load_mnist_format("fashion_mnist", tmp_path, download=False)
    assert arrays["train_x"].shape == (30, 1, 28, 28) and arrays["test_y"].shape == (20,)


def test_mnist_format_in_torchvision_layout_and_in_search_paths(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", n_train=30, n_test=20)
    assert load_mnist_format("mnist", tmp_path, download=False)["train_x"].shape[0] == 30
    elsewhere = write_mnist(tmp_path / "system", n_train=40, n_test=20)
    loaded = load_mnist_format("fashion_mnist", tmp_path / "empty", download=False, search_paths=[str(elsewhere)])
    assert loaded["train_x"].shape[0] == 40


def test_both_mnist_format_data_sets_take_search_paths_on_the_command_line(tmp_path):
    """data.search_paths is a setting of MNIST too (a cluster's shared copy): a plain override, which
    Hydra refused for a key mnist.yaml lacked, and which the added-key check refused with a '+'."""
    shared = write_mnist(tmp_path / "shared", n_train=40, n_test=20)
    for name in ("mnist", "fashion_mnist"):
        overrides = ("model=mlp", f"data={name}", f"data.root={tmp_path}/empty", "data.download=false",
                     f"data.search_paths=[{shared}]")
        check_added_keys_as_train_does(*overrides)
        assert load_data(compose_config(*overrides).data, seed=0).train_x.shape[0] == 40


def test_missing_mnist_names_the_data_set_the_directories_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_mnist_format("fashion_mnist", tmp_path, download=False)
    message = str(err.value)
    assert "Fashion-MNIST not found" in message and str(tmp_path) in message
    assert "data.download=true" in message and "dataset-fashion-mnist" in message


def test_failed_download_is_a_clear_error_not_fake_data(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):  # torchvision's own message spans lines
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example.org/, got:\n"
                               "<urlopen error network is unreachable>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(DatasetNotFoundError) as err:
        load_cifar10(tmp_path, download=True)
    assert str(err.value).startswith(f"CIFAR-10 not found in {tmp_path / 'cifar-10-batches-py'}, and downloading it "
                                     f"into {tmp_path} failed (RuntimeError: Error downloading train-images-idx3-ubyte"
                                     ".gz: Tried https://example.org/, got: <urlopen error network is unreachable>)")
    shared = tmp_path / "shared"
    with pytest.raises(DatasetNotFoundError) as err:
        load_mnist_format("mnist", tmp_path, download=True, search_paths=[str(shared)])
    message = str(err.value)
    assert "\n" not in message and message.startswith("MNIST not found in ")
    assert f"{tmp_path}, {tmp_path / 'MNIST' / 'raw'}, {shared}, and downloading" in message


def test_jobs_that_find_the_data_missing_at_once_download_it_one_at_a_time(tmp_path, monkeypatch):
    """The jobs of a parallel sweep start together and all find the data missing; two downloads into one
    folder at once write over each other's archive. The second waits, then finds the files there."""
    import torchvision.datasets

    downloads, inside, most_inside = [], [0], [0]

    class SlowDownload:  # torchvision's way: nothing to do when the files are there
        def __init__(self, root, train, download):
            inside[0] += 1
            most_inside[0] = max(most_inside[0], inside[0])
            time.sleep(0.3)
            raw = Path(root) / "MNIST" / "raw"
            if not raw.exists():
                write_mnist(raw)
                downloads.append(raw)
            inside[0] -= 1

    monkeypatch.setattr(torchvision.datasets, "MNIST", SlowDownload)
    loaded = []
    jobs = [threading.Thread(target=lambda: loaded.append(load_mnist_format("mnist", tmp_path, download=True)))
            for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert most_inside == [1] and len(downloads) == 1 and len(loaded) == 2
    assert all(np.array_equal(loaded[0][k], loaded[1][k]) for k in loaded[0])


def test_a_file_system_without_locks_downloads_unguarded_with_a_warning(tmp_path, monkeypatch, capsys):
    """Some cluster mounts refuse flock: the download goes ahead (it did before the lock), with a warning."""
    import fcntl

    import torchvision.datasets

    def no_locks(*args):
        raise OSError(37, "No locks available")

    class Download:
        def __init__(self, root, train, download):
            write_mnist(Path(root) / "MNIST" / "raw")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(torchvision.datasets, "MNIST", Download)
    assert len(load_mnist_format("mnist", tmp_path, download=True)["train_y"]) == 300
    assert f"warning: cannot lock {tmp_path / '.download.lock'} (No locks available)" in capsys.readouterr().err


def write_official_lookalike(directory, name, test_labels=None):
    """IDX files with the official release's 60,000 training and 10,000 test labels (their start) and one-pixel
    images; ``test_labels`` replaces the test labels."""
    labels, test = np.zeros(60000, dtype=np.uint8), np.zeros(10000, dtype=np.uint8)
    labels[:10], test[:10] = OFFICIAL_TRAIN_LABELS[name], OFFICIAL_TEST_LABELS[name]
    directory.mkdir(parents=True)
    for split, split_labels in (("train", labels), ("t10k", test if test_labels is None else test_labels)):
        write_idx(directory / f"{split}-images-idx3-ubyte", np.zeros((len(split_labels), 1, 1), np.uint8), True)
        write_idx(directory / f"{split}-labels-idx1-ubyte", split_labels, True)


@pytest.mark.parametrize("name, other, other_title", [("mnist", "fashion_mnist", "Fashion-MNIST"),
                                                       ("fashion_mnist", "mnist", "MNIST")])
def test_the_other_data_sets_files_in_the_shared_root_are_passed_over(tmp_path, name, other, other_title):
    # Both data sets have the same file names and, by default, the same data.root.
    root = tmp_path / "data"
    write_official_lookalike(root, other)
    with pytest.raises(DatasetNotFoundError, match=f"\\({root} holds {other_title}, not "):
        load_mnist_format(name, root, download=False)
    tv_class = "MNIST" if name == "mnist" else "FashionMNIST"
    write_mnist(root / tv_class / "raw", n_train=30, n_test=20)
    assert load_mnist_format(name, root, download=False)["train_x"].shape == (30, 1, 28, 28)
    assert load_mnist_format(other, root, download=False)["train_x"].shape == (60000, 1, 1, 1)


# Its files, not the directory: a download attempt into it leaves the directory without them.
@pytest.mark.skipif(find_idx_files(Path("/usr/share/datasets/fashion-mnist")) is None,
                    reason="no Debian dataset-fashion-mnist")
def test_the_real_fashion_mnist_is_told_from_mnist():
    assert official_release(find_idx_files(Path("/usr/share/datasets/fashion-mnist"))) == "fashion_mnist"


def test_cifar10_pickled_batches(tmp_path):
    write_cifar10(tmp_path, per_batch=12, n_test=7)
    arrays = load_cifar10(tmp_path, download=False)
    assert arrays["train_x"].shape == (60, 3, 32, 32) and arrays["train_x"].dtype == np.uint8
    assert arrays["test_y"].shape == (7,)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="lacks data_batch_3.*data.download=true"):
        load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("contents", [b"\x80\x02}q\x00(X", pickle.dumps(["not", "a", "batch"]),
                                      pickle.dumps({"data": np.zeros((5, 7), np.uint8), "labels": [0] * 5}),
                                      pickle.dumps({"data": np.zeros((5, 3072), np.uint8), "labels": [0] * 4})],
                         ids=["cut-short", "not-a-dict", "wrong-image-size", "too-few-labels"])
def test_damaged_cifar10_batch_names_the_file_and_the_fix(tmp_path, contents):
    write_cifar10(tmp_path, per_batch=12, n_test=7)
    damaged = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    damaged.write_bytes(contents)
    with pytest.raises(DatasetUnreadableError) as err:
        load_cifar10(tmp_path, download=False)
    message = str(err.value)
    assert message.startswith(f"CIFAR-10: cannot read {damaged} (") and "data.download=true" in message


def test_load_data_normalises_per_channel_with_training_statistics(cifar_root):
    data = load_data(data_cfg("cifar10", cifar_root), seed=0)
    assert data.train_x.dtype == torch.float32 and data.input_shape == (3, 32, 32)
    per_channel = data.train_x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert data.is_classification and data.num_classes == 10


def test_channel_statistics_are_numpys_without_a_float64_copy_of_the_data():
    import tracemalloc

    images = np.random.default_rng(0).integers(0, 256, (2000, 3, 32, 32), dtype=np.uint8)
    # Under `python -X tracemalloc` (what pytest suggests for a ResourceWarning's origin) tracing is already on and
    # holds the whole session: count from here, and leave that tracing on.
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        traced_before = tracemalloc.get_traced_memory()[0]
        mean, std = channel_statistics(images)
        peak = tracemalloc.get_traced_memory()[1] - traced_before
    finally:
        if started_here:
            tracemalloc.stop()
    np.testing.assert_allclose(mean, images.mean(axis=(0, 2, 3), dtype=np.float64) / 255, rtol=1e-13)
    np.testing.assert_allclose(std, images.std(axis=(0, 2, 3), dtype=np.float64) / 255, rtol=1e-13)
    assert peak < images.nbytes  # a float64 copy is 8 times that


@pytest.mark.parametrize("normalise", ["per_channel", "none"])
def test_a_black_pixel_is_what_the_data_loads_a_zero_pixel_as(tmp_path, normalise):
    """``TensorData.black``, the padding of random crops: a black image (all zeros on disk) loads as it."""
    root = write_cifar10(tmp_path)
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    batch["data"][0] = 0
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    data = load_data(data_cfg("cifar10", root, normalise=normalise), seed=0)
    assert torch.equal(data.test_x[0], data.black.view(3, 1, 1).expand(3, 32, 32))
    assert (data.black < 0).all() if normalise == "per_channel" else (data.black == 0).all()


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_load_data_without_normalisation_keeps_the_pixels_scaled_to_0_1(name, cifar_root, mnist_root):
    root = cifar_root if name == "cifar10" else mnist_root
    raw = load_cifar10(root, download=False) if name == "cifar10" else load_mnist_format(name, root, download=False)
    data = load_data(data_cfg(name, root, normalise="none"), seed=0)
    for split in ("train", "test"):
        assert torch.equal(getattr(data, f"{split}_x"), torch.from_numpy(raw[f"{split}_x"]).float() / 255)
    with pytest.raises(ValueError, match="normalise must be one of"):
        load_data(data_cfg(name, root, normalise="global"), seed=0)


def test_load_data_subsets_take_the_first_samples(mnist_root):
    full = load_data(data_cfg("mnist", mnist_root), seed=0)
    small = load_data(data_cfg("mnist", mnist_root, max_train_samples=50, max_test_samples=10), seed=0)
    assert len(small.train_x) == len(small.train_y) == 50 and len(small.test_x) == len(small.test_y) == 10
    assert torch.equal(small.train_x, full.train_x[:50]) and torch.equal(small.train_y, full.train_y[:50])
    assert torch.equal(small.test_x, full.test_x[:10]) and torch.equal(small.test_y, full.test_y[:10])


def test_gaussian_regression_is_fixed_by_the_seed_and_linear():
    x, y = gaussian_regression(1000, 10, seed=3)
    x2, y2 = gaussian_regression(1000, 10, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, gaussian_regression(1000, 10, seed=4)[0])
    a = torch.linalg.lstsq(x.double(), y.double()).solution.T
    torch.testing.assert_close((x.double() @ a.T).float(), y, atol=1e-4, rtol=1e-4)
    assert x.mean().abs() < 0.1 and (x.std() - 1).abs() < 0.05


def test_gaussian_regressions_standard_deviations_scale_the_same_draws():
    """x ~ N(0, x_std^2 I), A_ij ~ N(0, a_std^2): the seed's draws times the standard deviations, so the
    protocol's 1 and 1 give, bit for bit, the data of runs made before they were config values."""
    x, y = gaussian_regression(1000, 10, seed=3)
    gen = torch.Generator().manual_seed(derived_seed("gaussian_regression", 3))
    a, x_drawn = torch.randn(10, 10, generator=gen), torch.randn(1000, 10, generator=gen)
    assert torch.equal(x, x_drawn) and torch.equal(y, x_drawn @ a.T)
    x2, y2 = gaussian_regression(1000, 10, seed=3, x_std=2.0, a_std=0.5)
    assert torch.equal(x2, 2 * x_drawn) and torch.equal(y2, (2 * x_drawn) @ (0.5 * a).T)


def test_gaussian_regression_is_not_drawn_from_the_stream_that_initialises_the_model():
    """The run seeds torch's global stream with its seed and initialises the model from it; drawing A and x
    from a stream seeded alike built a quarter of the DLN's inputs from the numbers behind its initial
    weights (x correlated with them at -0.7), in every seed."""
    x, y = gaussian_regression(1000, 10, seed=0)
    same_seed = torch.Generator().manual_seed(0)
    a_from_it, x_from_it = torch.randn(10, 10, generator=same_seed), torch.randn(1000, 10, generator=same_seed)
    assert not torch.equal(x, x_from_it) and not torch.equal(y, x_from_it @ a_from_it.T)


def test_batches_cover_each_epoch_without_replacement_and_are_repeatable():
    x = torch.arange(100).float().view(100, 1)
    y = torch.arange(100)
    whole = BatchStream(x, y, batch_size=25, seed=0)  # a batch size that divides the data: no batch dropped
    assert sorted(torch.cat([whole.next()[1] for _ in range(4)]).tolist()) == list(range(100))
    stream = BatchStream(x, y, batch_size=30, seed=0)
    epoch = [stream.next() for _ in range(3)]  # 90 of 100; the last 10 are dropped
    seen = torch.cat([b[1] for b in epoch])
    assert len(set(seen.tolist())) == 90
    assert all(torch.equal(bx.view(-1).long(), by) for bx, by in epoch)
    next_epoch = stream.next()[1]
    assert not torch.equal(next_epoch, epoch[0][1])  # reshuffled
    again = BatchStream(x, y, batch_size=30, seed=0)
    assert all(torch.equal(again.next()[1], b[1]) for b in epoch)


def test_full_batch_is_the_data_set_in_order():
    x, y = torch.randn(10, 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match="between 1 and the data set size"):
        BatchStream(x, y, batch_size=0, seed=0)
    stream = BatchStream(x, y, batch_size=10, seed=0)
    bx, by = stream.next()
    assert bx is x and by is y
    with pytest.raises(ValueError, match="between 1 and the data set size 10"):
        BatchStream(x, y, batch_size=11, seed=0)


def test_batch_stream_state_round_trip_continues_identically():
    x, y = torch.randn(50, 2), torch.arange(50)
    a = BatchStream(x, y, batch_size=7, seed=1, augment=False)
    for _ in range(9):
        a.next()
    state = a.state_dict()
    expected = [a.next()[1] for _ in range(10)]
    b = BatchStream(x, y, batch_size=7, seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(b.next()[1], e) for e in expected)


def test_a_stream_saved_on_another_device_continues_its_order_unless_it_augments():
    """A run may resume on another device (its identity leaves the device out). The data order continues,
    drawn on the CPU either way; augmentation draws made by a GPU generator cannot continue on the CPU (nor
    the other way), so such a stream is refused, not continued with other draws. The saved state stands in
    for one written on a GPU: this machine may have none."""
    x, y = torch.randn(50, 1, 4, 4), torch.arange(50)
    a = BatchStream(x, y, batch_size=7, seed=1)
    a.next()
    state = {**a.state_dict(), "augment_device": "cuda", "augment_generator": torch.zeros(16, dtype=torch.uint8)}
    expected = [a.next()[1] for _ in range(10)]
    b = BatchStream(x, y, batch_size=7, seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(b.next()[1], e) for e in expected)
    with pytest.raises(ValueError, match="augmentation draws were made on cuda and cannot continue on cpu"):
        BatchStream(x, y, batch_size=7, seed=1, augment=True).load_state_dict(state)


def test_augmentation_draws_from_a_stream_of_its_own():
    """Seeded with seed + 1, the crops of seed s were drawn with the bits of seed s+1's model initialisation
    and shuffling (both streams start from manual_seed(s+1)): a seed sweep's runs were not independent."""
    x, y = torch.randn(50, 1, 4, 4), torch.arange(50)
    for seed in (0, 1, 7):
        stream = BatchStream(x, y, batch_size=7, seed=seed, augment=True)
        augment_state = stream.augment_generator.get_state()
        for other in (seed - 1, seed, seed + 1):
            if other >= 0:
                assert not torch.equal(augment_state, torch.Generator().manual_seed(other).get_state())


def test_the_draws_of_seed_0_are_pinned():
    """Golden values. The committed runs were shuffled with this order (none augments); changing how the order
    or the crops are drawn changes every run of that kind, so do it on purpose, with such runs regenerated."""
    x = torch.arange(6 * 16.0).view(6, 1, 4, 4)
    stream = BatchStream(x, torch.arange(6), batch_size=3, seed=0, augment=True, crop_padding=1)

    def crop_of(image: torch.Tensor, out: torch.Tensor) -> tuple[int, int, bool]:
        padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
        for dy in range(3):
            for dx in range(3):
                for flip in (False, True):
                    crop = padded[:, dy : dy + 4, dx : dx + 4]
                    if torch.equal(crop.flip(2) if flip else crop, out):
                        return dy, dx, flip
        raise AssertionError("not a padded crop")

    batches = [stream.next() for _ in range(2)]
    assert [by.tolist() for _, by in batches] == [[2, 5, 3], [0, 1, 4]]  # the order, one epoch
    assert [[crop_of(x[i], out) for out, i in zip(bx, by)] for bx, by in batches] == [
        [(1, 1, False), (2, 2, True), (1, 0, False)], [(0, 1, True), (2, 1, False), (2, 1, False)]]


@pytest.mark.parametrize("pad_value", [None, (-1.0, -2.0, -3.0)])
def test_crop_and_flip_shift_and_mirror_each_image(pad_value):
    image = torch.arange(48.0).view(1, 3, 4, 4)
    x = image.repeat(200, 1, 1, 1)
    fill = None if pad_value is None else torch.tensor(pad_value)
    out = BatchStream(x, torch.zeros(200), batch_size=200, seed=0, augment=True, crop_padding=1,
                      pad_value=fill).next()[0]
    padded = torch.stack([torch.nn.functional.pad(image[0, c], (1, 1, 1, 1), value=(pad_value or (0.0,) * 3)[c])
                          for c in range(3)])  # each channel with its own value
    candidates = [padded[:, dy : dy + 4, dx : dx + 4] for dy in range(3) for dx in range(3)]
    candidates += [c.flip(2) for c in candidates]
    found = set()
    for img in out:
        matches = [i for i, c in enumerate(candidates) if torch.equal(img, c)]
        assert matches, "every augmented image is a padded crop, possibly mirrored"
        found.add(matches[0])
    assert len(found) > 12  # offsets and flips actually vary
