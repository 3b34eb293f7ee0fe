"""Tests of experiments.data: MNIST-1D, digits and IDX files written here."""

import gzip
import random
import tracemalloc

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
    with pytest.raises(
        ValueError, match=r"0x00000803, expected 0x00000801 \(3 dimensions, expected 1"
    ):
        data.load_dataset("idx", tmp_path)
    write_mnist(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").replace(tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(ValueError, match=r"0x1F8B08.*\(a gzip file: its name must end in \.gz\)"):
        data.load_dataset("idx", tmp_path)
    # Compressed twice: the name does end in .gz, so that is not the advice to give.
    write_mnist(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(ValueError, match=r"0x1F8B08.*\(gzip data inside the \.gz: compressed tw"):
        data.load_dataset("idx", tmp_path)


@pytest.mark.parametrize("code", [0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_idx_other_data_types_are_refused_by_name(tmp_path, code):
    """IDX also stores sbyte, short, int, float and double; MNIST's files are ubyte (0x08)."""
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", code << 8 | 3, np.zeros((4, 5, 3)))
    name = data.IDX_TYPES[code]
    with pytest.raises(ValueError, match=f"0x00000{code:X}03, expected 0x00000803 .*{name}s; only"):
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
    write_mnist(tmp_path, gz=True)
    raw = bytearray(path.read_bytes())
    raw[-6] ^= 0xFF  # inside the CRC-32 of the trailer: the payload itself decompresses fine
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"cannot decompress.*CRC"):
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


@pytest.mark.parametrize(
    "dims", [(2**31, 28, 28), (2**21, 2**21, 2**22)], ids=["2**31 images", "2**64 bytes"]
)
def test_idx_header_declaring_huge_sizes_is_refused_without_allocating(tmp_path, dims):
    write_mnist(tmp_path)
    header = b"".join(d.to_bytes(4, "big") for d in dims)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        data.IDX_IMAGES_MAGIC.to_bytes(4, "big") + header
    )
    expected = dims[0] * dims[1] * dims[2]  # exact: 2**64 must not wrap around to 0 bytes
    with pytest.raises(
        ValueError, match=f"images-idx3-ubyte' has 0 data bytes, expected {expected} "
    ):
        data.load_dataset("idx", tmp_path)


def test_idx_gz_that_expands_to_much_more_than_its_header_is_read_in_pieces(tmp_path):
    """A 32 KiB .gz holding 32 MiB of trailing zeros is refused with bounded memory."""
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    extra = 32 << 20
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(data.IDX_LABELS_MAGIC.to_bytes(4, "big") + (6).to_bytes(4, "big") + bytes(6))
        for _ in range(extra >> 20):
            f.write(bytes(1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=f"has {6 + extra} data bytes, expected 6"):
            data.load_dataset("idx", tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < extra // 4, peak


def test_idx_zero_examples(tmp_path):
    for n_train, n_test in [(0, 4), (6, 0)]:
        write_mnist(tmp_path, n_train=n_train, n_test=n_test)
        with pytest.raises(ValueError, match="hold no examples"):
            data.load_dataset("idx", tmp_path)


def test_idx_plain_file_wins_over_gz_and_a_folder_is_not_a_file(tmp_path):
    arrays = write_mnist(tmp_path)
    write_mnist(tmp_path, n_train=7, gz=True)  # other data in the .gz files
    ds = data.load_dataset("idx", tmp_path)
    np.testing.assert_array_equal(ds.x_train * 255, arrays["train-images-idx3-ubyte"])
    for name in ("t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).unlink()
    (tmp_path / "t10k-labels-idx1-ubyte").mkdir()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte' is not a regular file"):
        data.load_dataset("idx", tmp_path)


def test_idx_digest_covers_every_file_and_not_the_compression(tmp_path):
    plain, gz = tmp_path / "plain", tmp_path / "gz"
    arrays = {
        "train-images-idx3-ubyte": np.arange(6 * 15).reshape(6, 5, 3),
        "train-labels-idx1-ubyte": np.arange(6) % 4,
        "t10k-images-idx3-ubyte": np.arange(4 * 15).reshape(4, 5, 3)[::-1],
        "t10k-labels-idx1-ubyte": np.arange(4) % 3,
    }
    for folder, compress in ((plain, False), (gz, True)):
        folder.mkdir()
        for name, array in arrays.items():
            magic = data.IDX_IMAGES_MAGIC if "images" in name else data.IDX_LABELS_MAGIC
            write_idx(folder / (name + (".gz" if compress else "")), magic, array, gz=compress)
    digest = data.load_dataset("idx", plain).digest
    # Pinned: a change of the formula would make every stored idx run look new.
    assert digest == data.load_dataset("idx", gz).digest == "a64697d98fd0b4de"
    for name, array in arrays.items():
        changed = array.copy()
        changed.flat[-1] = (changed.flat[-1] + 1) % 3  # stays a valid label
        magic = data.IDX_IMAGES_MAGIC if "images" in name else data.IDX_LABELS_MAGIC
        write_idx(plain / name, magic, changed)
        assert data.load_dataset("idx", plain).digest != digest, name
        write_idx(plain / name, magic, array)
    assert data.load_dataset("idx", plain).digest == digest


def test_idx_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_dataset("idx", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.load_dataset("idx", tmp_path / "nope")
    with pytest.raises(ValueError, match="data_dir is required"):
        data.load_dataset("idx")


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_a_data_dir_for_a_built_in_dataset_is_refused(name, tmp_path):
    # Was ignored: load_dataset("mnist1d", "~/mnist") returned MNIST-1D (the CLI refuses it).
    with pytest.raises(ValueError, match=f"data_dir=.*for '{name}'"):
        data.load_dataset(name, tmp_path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="name='cifar'"):
        data.load_dataset("cifar")


def test_digits():
    from sklearn.datasets import load_digits

    ds = data.load_dataset("digits")
    assert ds.input_shape == (8, 8) and ds.num_classes == 10
    assert (ds.n_train, len(ds.y_test)) == (1438, 359)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # The split is a partition of the 1797 images (pixels 0..16 scaled by 1/16), fixed by its seed.
    raw = load_digits()
    order = np.random.default_rng(data.DIGITS_SPLIT_SEED).permutation(1797)
    np.testing.assert_array_equal(ds.x_test * 16, raw.images[order[:359]])
    np.testing.assert_array_equal(ds.y_train, raw.target[order[359:]])


@pytest.mark.parametrize("name", ["digits", "mnist1d"])
def test_cached_datasets_cannot_be_changed_by_a_caller(name):
    ds = data.load_dataset(name)
    fields = ("x_train", "y_train", "x_test", "y_test")
    kept = {field: getattr(ds, field).copy() for field in fields}
    for field in fields:
        getattr(ds, field)[...] = 7  # a caller's own arrays: writable
    again = data.load_dataset(name)
    for field in fields:
        np.testing.assert_array_equal(getattr(again, field), kept[field], err_msg=field)


def test_mnist1d():
    """The paper's data: get_dataset_args() defaults (5000 samples, 80/20, seed 42), built once.

    Building it leaves the global numpy and random generators as they were.
    """
    data._mnist1d.cache_clear()
    np.random.seed(1)  # noqa: NPY002
    random.seed(1)
    ds = data.load_dataset("mnist1d")
    assert np.random.rand() == np.random.RandomState(1).rand()  # noqa: NPY002
    assert random.random() == random.Random(1).random()
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert set(np.unique(ds.y_train)) == set(range(10))


def test_idx_training_labels_of_one_class_are_refused(tmp_path):
    """One class leaves nothing to learn: labels all 0 made a 1-class model whose loss is 0."""
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", data.IDX_LABELS_MAGIC, np.zeros(6))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", data.IDX_LABELS_MAGIC, np.zeros(4))
    with pytest.raises(ValueError, match=r"training labels in .* are all 0: a classifier needs"):
        data.load_dataset("idx", tmp_path)
    # Also when the test labels hold more classes: the model would never see one of them.
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", data.IDX_LABELS_MAGIC, np.arange(4))
    write_idx(tmp_path / "train-labels-idx1-ubyte", data.IDX_LABELS_MAGIC, np.full(6, 7))
    with pytest.raises(ValueError, match="are all 7"):
        data.load_dataset("idx", tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", data.IDX_LABELS_MAGIC, [7, 7, 7, 7, 7, 2])
    assert data.load_dataset("idx", tmp_path).num_classes == 8  # two classes: accepted


def test_idx_empty_data_dir_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    """``--data-dir "$UNSET"`` passes ''; Path('') is '.', and the IDX files there were read."""
    write_mnist(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="data_dir must be a folder's path, got data_dir=''"):
        data.load_dataset("idx", "")
    assert data.load_dataset("idx", ".").n_train == 6  # an explicit '.' still means here


def test_idx_broken_symlink_is_named_not_reported_missing(tmp_path):
    write_mnist(tmp_path)
    link = tmp_path / "t10k-images-idx3-ubyte"
    link.unlink()
    link.symlink_to(tmp_path / "moved-away")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte' is a broken symbolic"):
        data.load_dataset("idx", tmp_path)
    link.unlink()
    link.symlink_to(link)  # a loop
    with pytest.raises(FileNotFoundError, match="is a broken symbolic link"):
        data.load_dataset("idx", tmp_path)


@pytest.mark.parametrize("magic", ["0x803", 0x0D01, 0x0802, 2051.0, None])
def test_read_idx_refuses_a_magic_argument_it_cannot_read(tmp_path, magic):
    """Was a TypeError for a str, and for 0x0D01 'its data are ubytes; only ubyte ... are read'."""
    path = tmp_path / "labels"
    write_idx(path, data.IDX_LABELS_MAGIC, np.arange(3))
    with pytest.raises(ValueError, match=f"magic must be IDX_IMAGES_MAGIC .*, got magic={magic!r}"):
        data.read_idx(path, magic)
    np.testing.assert_array_equal(data.read_idx(path, data.IDX_LABELS_MAGIC), np.arange(3))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("size", [0, 3])
def test_read_idx_a_file_shorter_than_its_magic_number_is_truncated(tmp_path, size, gz):
    path = tmp_path / ("labels.gz" if gz else "labels")
    write_idx(path, data.IDX_LABELS_MAGIC, np.arange(3), gz=gz, cut=4 + 4 + 3 - size)
    with pytest.raises(ValueError, match=f"is truncated: {size} bytes, no header"):
        data.read_idx(path, data.IDX_LABELS_MAGIC)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("cut", [1, 4])
def test_read_idx_a_header_cut_inside_its_dimensions_is_truncated(tmp_path, cut, gz):
    # With the magic number whole and the dimensions cut short (down to none, cut=4), a missing
    # dimension must not read as 0: a .gz of labels holding only its magic number was 0 labels.
    path = tmp_path / ("labels.gz" if gz else "labels")
    write_idx(path, data.IDX_LABELS_MAGIC, np.zeros(0), gz=gz, cut=cut)
    with pytest.raises(ValueError, match="is truncated inside its header"):
        data.read_idx(path, data.IDX_LABELS_MAGIC)


@pytest.mark.parametrize("shape", [(2, 0, 3), (2, 3, 0), (2, 0, 0)])
def test_read_idx_images_of_no_pixels_are_refused(tmp_path, shape):
    path = tmp_path / "images"
    write_idx(path, data.IDX_IMAGES_MAGIC, np.zeros(shape))
    with pytest.raises(ValueError, match=rf"has empty images of shape \({shape[1]}, {shape[2]}\)"):
        data.read_idx(path, data.IDX_IMAGES_MAGIC)


def test_idx_num_classes_counts_a_class_seen_only_in_the_test_labels(tmp_path):
    write_mnist(tmp_path)  # training labels 0..5
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", data.IDX_LABELS_MAGIC, [0, 1, 9, 2])
    ds = data.load_dataset("idx", tmp_path)
    assert int(ds.y_train.max()) == 5 and ds.num_classes == 10  # the model can output label 9


def test_idx_gz_with_an_invalid_deflate_stream_is_a_value_error(tmp_path):
    # A gzip header (no name, mtime 0) and a deflate block of the reserved type 3: zlib.error.
    path = tmp_path / "labels.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\x07" + bytes(8))
    with pytest.raises(ValueError, match=r"cannot decompress IDX file .*invalid block type"):
        data.read_idx(path, data.IDX_LABELS_MAGIC)


def _tiny(**changes):
    rng = np.random.default_rng(0)
    fields = dict(
        name="tiny",
        x_train=rng.normal(size=(6, 4)).astype(np.float32),
        y_train=np.array([0, 1, 2, 0, 1, 2], np.int32),
        x_test=rng.normal(size=(3, 4)).astype(np.float32),
        y_test=np.array([2, 1, 0], np.int32),
        num_classes=3,
    )
    return data.Dataset(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"y_train": np.array([0, 1, 2, 0, 1, 3], np.int32)}, r"y_train holds labels 0\.\.3"),
        ({"y_test": np.array([-1, 1, 0], np.int32)}, r"y_test holds labels -1\.\.1"),
        ({"y_train": np.zeros(5, np.int32)}, "x_train of shape .6, 4. and y_train of shape .5,."),
        ({"x_test": np.zeros((3, 5), np.float32)}, "x_test's examples are of shape .5,."),
        ({"x_train": np.zeros(6, np.float32)}, "x_train of shape .6,. and y_train"),
        ({"y_train": np.zeros(6, np.float32)}, "y_train must be a NumPy array of integer"),
        ({"x_train": np.zeros((6, 4), np.int32)}, "x_train must be a NumPy array of floats"),
        ({"x_test": [[0.0] * 4] * 3}, "x_test must be a NumPy array of floats, got a list"),
        ({"num_classes": 0}, "num_classes must be an int >= 1, got 0"),
        ({"num_classes": 3.0}, "num_classes must be an int >= 1, got 3.0"),
        # Were accepted, and run_group then failed with a ZeroDivisionError.
        (
            {"x_test": np.zeros((0, 4), np.float32), "y_test": np.zeros(0, np.int32)},
            r"x_test of shape \(0, 4\) holds no data",
        ),
        (
            {"x_train": np.zeros((0, 4), np.float32), "y_train": np.zeros(0, np.int32)},
            r"x_train of shape \(0, 4\) holds no data",
        ),
        (
            {"x_train": np.zeros((6, 0), np.float32), "x_test": np.zeros((3, 0), np.float32)},
            r"x_train of shape \(6, 0\) holds no data: .* an example at least one value",
        ),
        (
            {"x_train": np.zeros((6, 2, 0), np.float32), "x_test": np.zeros((3, 2, 0), np.float32)},
            r"x_train of shape \(6, 2, 0\) holds no data",
        ),
        (
            {"x_test": np.array([[0, np.nan, 0, 0], [0] * 4, [np.inf, -np.inf, 0, 0]], np.float32)},
            r"x_test holds 3 non-finite values \(NaN or infinity\)",
        ),
        ({"x_train": np.full((6, 4), np.inf, np.float32)}, "x_train holds 24 non-finite values"),
    ],
)
def test_a_dataset_built_by_hand_is_checked(changes, match):
    # Nothing was checked: a label of 3 with 3 classes trained (on a wrong one-hot or a clipped
    # index) without an error.
    with pytest.raises(ValueError, match=match):
        _tiny(**changes)


def test_a_dataset_built_by_hand_that_pairs_up_is_accepted():
    assert _tiny().n_train == 6 and _tiny().input_shape == (4,)
