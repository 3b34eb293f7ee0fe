"""Tests of experiments.data: MNIST-1D, digits and IDX files written here."""

import gzip

import numpy as np
import pytest

from experiments import data


def write_idx(path, magic, array, *, gz=False, cut=0):
    """Writes ``array`` (uint8) as an IDX file; ``cut`` drops that many trailing bytes."""
    array = np.asarray(array, np.uint8)
    raw = magic.to_bytes(4, "big")
    raw += b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    raw = raw[: len(raw) - cut]
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_mnist(folder, *, n_train=6, n_test=4, rows=5, cols=3, gz=False):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, rows, cols)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, rows, cols)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 3,
    }
    for name, array in arrays.items():
        magic = data.IDX_IMAGES_MAGIC if "images" in name else data.IDX_LABELS_MAGIC
        write_idx(folder / (name + suffix), magic, array, gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = data.load_dataset("idx", tmp_path)
    assert ds.name == "idx"
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.input_shape == (5, 3) and ds.n_train == 6 and len(ds.y_test) == 4
    np.testing.assert_array_equal(ds.x_train * 255, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.num_classes == 6  # labels 0..5 in train


def test_idx_wrong_magic(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", data.IDX_IMAGES_MAGIC, np.zeros((6, 1, 1)))
    with pytest.raises(ValueError, match="magic number 0x00000803, expected 0x00000801"):
        data.load_dataset("idx", tmp_path)


@pytest.mark.parametrize("cut", [1, 10, 30])
def test_idx_truncated(tmp_path, cut):
    write_mnist(tmp_path)
    write_idx(
        tmp_path / "t10k-images-idx3-ubyte",
        data.IDX_IMAGES_MAGIC,
        np.zeros((4, 5, 3)),
        cut=cut,
    )
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        data.load_dataset("idx", tmp_path)


def test_idx_trailing_bytes(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="7 data bytes, expected 6"):
        data.load_dataset("idx", tmp_path)


def test_idx_corrupt_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="cannot decompress"):
        data.load_dataset("idx", tmp_path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot decompress"):
        data.load_dataset("idx", tmp_path)


def test_idx_counts_and_shapes_must_agree(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", data.IDX_LABELS_MAGIC, np.zeros(5))
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        data.load_dataset("idx", tmp_path)
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", data.IDX_IMAGES_MAGIC, np.zeros((4, 3, 5)))
    with pytest.raises(ValueError, match="train images are"):
        data.load_dataset("idx", tmp_path)


def test_idx_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_dataset("idx", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.load_dataset("idx", tmp_path / "nope")
    with pytest.raises(ValueError, match="data_dir is required"):
        data.load_dataset("idx")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="name='cifar'"):
        data.load_dataset("cifar")


def test_digits():
    ds = data.load_dataset("digits")
    assert ds.input_shape == (8, 8) and ds.num_classes == 10
    assert ds.n_train + len(ds.y_test) == 1797
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert data.load_dataset("digits") is ds  # cached in memory


def test_mnist1d():
    ds = data.load_dataset("mnist1d")
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert set(np.unique(ds.y_train)) == set(range(10))
