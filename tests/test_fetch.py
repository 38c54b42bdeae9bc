"""Format tests of each data source, the IDX reader, the stage's output directory and the digest."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_format import (
    CLASS_NAMES as CIFAR_CLASSES,
    GADGET_CALLS,
    Gadget,
    batch_bytes,
    cifar_images,
    file_member,
    official_members,
    special_member,
    write_tarball,
)
from idx_format import idx_bytes, write_gz, write_idx_gz
from pipeline import fetch
from pipeline.config import (
    ConfigError, CsvConfig, DataConfig, ImageFolderConfig, PreprocessConfig, load_config, validate,
)
from pipeline.errors import PipelineError
from pipeline.fetch import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    RawDataset,
    dataset_digest,
    fetch_dataset,
    load_raw,
    read_idx,
    read_idx_pair,
    save_raw,
)
from pipeline.files import sha256_file
from pipeline.preprocess import preprocess

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
needs_debian_files = pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir(), reason=f"{DEBIAN_FASHION} missing (apt-get install dataset-fashion-mnist)"
)

SHAPE = (4, 4, 1)
PIXELS = [f"pixel{i}" for i in range(16)]


def fashion_config(directory, download=False, download_dir=None) -> DataConfig:
    extra = {"download_dir": str(download_dir)} if download_dir else {}
    return DataConfig(source="fashion_mnist", dir=str(directory), download=download, **extra)


def csv_config(train, test=None, **columns) -> DataConfig:
    return DataConfig(
        source="csv",
        download=False,
        csv=CsvConfig(train=str(train) if train else None, test=str(test) if test else None, **columns),
        image_shape=SHAPE,
    )


def pixel_values(row: int) -> list[int]:
    return [(row * 16 + j * 7) % 256 for j in range(16)]


def write_csv(path: Path, header: list, rows: list[list]) -> Path:
    path.write_text("\n".join(",".join(str(v) for v in line) for line in [header, *rows]) + "\n")
    return path


def small_images(n: int = 3, rows: int = 2, cols: int = 5) -> np.ndarray:
    return (np.arange(n * rows * cols) * 37 % 256).astype(np.uint8).reshape(n, rows, cols)


# ---------------------------------------------------------------------------------------------
# IDX reader


def test_read_idx_pair_decodes_images_and_labels(tmp_path):
    images = small_images()
    labels = np.array([2, 0, 1], dtype=np.uint8)
    x, y = read_idx_pair(write_idx_gz(tmp_path / "i.gz", images), write_idx_gz(tmp_path / "l.gz", labels))
    assert x.shape == (3, 2, 5, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[..., 0], images)
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, labels)
    x[0, 0, 0, 0] = 1  # writable, not a view of the file's bytes


@pytest.mark.parametrize(
    "data, magic, expected",
    [
        pytest.param(idx_bytes(np.arange(3)), IDX_IMAGES_MAGIC, "magic number 0x00000801, expected 0x00000803",
                     id="labels-read-as-images"),
        pytest.param(b"\x00\x00\x08\x03\x00", IDX_IMAGES_MAGIC, "5 bytes, shorter than the 16-byte header",
                     id="short-header"),
        pytest.param(b"\x00\x00", IDX_LABELS_MAGIC, "magic number none", id="shorter-than-magic"),
        pytest.param(idx_bytes(small_images())[:-1], IDX_IMAGES_MAGIC, "truncated or has trailing bytes",
                     id="truncated-payload"),
        pytest.param(idx_bytes(np.arange(3)) + b"\x00", IDX_LABELS_MAGIC, "truncated or has trailing bytes",
                     id="trailing-bytes"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, data, magic, expected):
    path = write_gz(tmp_path / "bad-idx.gz", data)
    with pytest.raises(PipelineError, match="^bad-idx.gz: ") as err:
        read_idx(path, magic)
    assert expected in str(err.value)


def test_read_idx_truncated_payload_names_expected_size(tmp_path):
    path = write_gz(tmp_path / "images.gz", idx_bytes(small_images())[:-1])
    with pytest.raises(PipelineError, match=r"images.gz: 45 bytes, expected 46 for header dimensions \[3, 2, 5\]"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_read_idx_pair_rejects_count_mismatch(tmp_path):
    images = write_idx_gz(tmp_path / "imgs.gz", small_images(3))
    labels = write_idx_gz(tmp_path / "labs.gz", np.array([1, 2], dtype=np.uint8))
    with pytest.raises(PipelineError, match="imgs.gz has 3 images but labs.gz has 2 labels"):
        read_idx_pair(images, labels)


def test_read_idx_rejects_a_file_that_is_not_gzip(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(idx_bytes(np.arange(3)))
    with pytest.raises(PipelineError, match="plain.gz: not a complete gzip file"):
        read_idx(path, IDX_LABELS_MAGIC)


# ---------------------------------------------------------------------------------------------
# fashion_mnist


@needs_debian_files
def test_fashion_mnist_from_debian_files():
    ds = fetch_dataset(fashion_config(DEBIAN_FASHION))
    assert ds.train_x.shape == (60000, 28, 28, 1) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (10000, 28, 28, 1)
    assert ds.train_y.dtype == np.int64 and ds.test_y.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(ds.train_y), [6000] * 10)
    assert ds.class_names == FASHION_CLASSES
    assert ds.unlabeled_x is None and ds.unlabeled_ids is None
    manifest = ds.manifest
    assert manifest["counts"] == {"train": 60000, "test": 10000, "unlabeled": 0}
    assert manifest["image_shape"] == [28, 28, 1] and manifest["class_names"] == FASHION_CLASSES
    expected = fetch.IDX_SOURCES["fashion_mnist"].content_sha256
    for record in manifest["files"]:
        assert record["content_sha256"] == expected[record["name"].removesuffix(".gz")]
        assert record["verified_by"] == "content_sha256" and "md5" not in record
        assert record["sha256"] == hashlib.sha256(Path(record["path"]).read_bytes()).hexdigest()
        assert record["bytes"] == Path(record["path"]).stat().st_size
    assert [r["name"] for r in manifest["files"]] == FASHION_FILES


def write_small_fashion_files(directory: Path) -> None:
    for name in FASHION_FILES:
        array = small_images() if "images" in name else np.array([0, 1, 2], dtype=np.uint8)
        write_idx_gz(directory / name, array)


def test_fashion_mnist_checksum_mismatch(tmp_path):
    write_small_fashion_files(tmp_path)
    expected = fetch.IDX_SOURCES["fashion_mnist"].content_sha256["train-images-idx3-ubyte"]
    with pytest.raises(PipelineError, match="train-images-idx3-ubyte.gz: sha256") as err:
        fetch_dataset(fashion_config(tmp_path))
    message = str(err.value)
    assert f"expected {expected}" in message
    assert hashlib.sha256(idx_bytes(small_images())).hexdigest() in message


def test_fashion_mnist_missing_files_without_download(tmp_path):
    with pytest.raises(PipelineError) as err:
        fetch_dataset(fashion_config(tmp_path, download=False))
    message = str(err.value)
    assert f"train-images-idx3-ubyte.gz not found in {tmp_path}" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.download" in message
    assert "\n" not in message


def use_mirrors(monkeypatch, *urls: str) -> None:
    spec = fetch.IDX_SOURCES["fashion_mnist"]
    monkeypatch.setitem(fetch.IDX_SOURCES, "fashion_mnist", dataclasses.replace(spec, urls=urls))


@needs_debian_files
def test_fashion_mnist_download_falls_back_to_the_next_mirror(tmp_path, monkeypatch):
    # file:// URLs: keras.utils.get_file copies them through urllib, no network needed
    use_mirrors(monkeypatch, (tmp_path / "no-such-mirror").as_uri() + "/", DEBIAN_FASHION.as_uri() + "/")
    cfg = fashion_config(tmp_path / "empty", download=True, download_dir=tmp_path / "cache")
    ds = fetch_dataset(cfg)
    assert ds.train_x.shape == (60000, 28, 28, 1)
    for name, record in zip(FASHION_FILES, ds.manifest["files"]):
        assert record["url"] == DEBIAN_FASHION.as_uri() + "/" + name
        assert record["path"] == str(tmp_path / "cache" / "fashion-mnist" / name)
    use_mirrors(monkeypatch)  # the second fetch must come from the cache
    again = fetch_dataset(cfg)
    assert all("url" not in record for record in again.manifest["files"])
    assert dataset_digest(again) == dataset_digest(ds)


def test_fashion_mnist_download_failure_says_how_to_get_the_files(tmp_path, monkeypatch):
    use_mirrors(monkeypatch, (tmp_path / "mirror-a").as_uri() + "/", (tmp_path / "mirror-b").as_uri() + "/")
    with pytest.raises(PipelineError) as err:
        fetch_dataset(fashion_config(tmp_path / "dir", download=True, download_dir=tmp_path / "cache"))
    message = str(err.value)
    assert f"train-images-idx3-ubyte.gz not found in {tmp_path / 'dir'}" in message
    assert "mirror-a/train-images-idx3-ubyte.gz" in message and "mirror-b/train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.dir" in message
    assert "\n" not in message
    assert not list((tmp_path / "cache").rglob("*.gz"))


# ---------------------------------------------------------------------------------------------
# data config: per-source folders, new sections


@pytest.mark.parametrize("source, expected", [
    ("fashion_mnist", "/usr/share/datasets/fashion-mnist"),
    ("mnist", "~/.cache/image-pipeline/mnist"),
    ("cifar10", "~/.cache/image-pipeline/cifar10"),
    ("csv", None),
    ("image_folder", None),
    ("digits", None),
])
def test_data_dir_null_means_the_sources_own_folder(source, expected):
    assert DataConfig(source=source).dir == expected
    assert DataConfig(source=source, dir=None).dir == expected
    assert DataConfig(source=source, dir="/x").dir == "/x"
    assert validate({"data": {"source": source, "dir": None}}).data.dir == expected


@pytest.mark.parametrize("overrides, expected", [
    (["data.source=cifar"], "data.source = 'cifar' is not allowed; expected one of 'fashion_mnist', 'mnist', "
                            "'cifar10', 'csv', 'image_folder' or 'digits'; did you mean 'cifar10'?"),
    (["data.image_folder.trian=x"], "unknown key 'data.image_folder.trian'; did you mean 'data.image_folder.train'?"),
    (["data.image_folder.resize=maybe"], "data.image_folder.resize = 'maybe': Input should be a valid boolean"),
    (["data.image_shape=[0, 28, 1]"], "data.image_shape = [0, 28, 1]: expected three positive integers"),
    (["data.source=image_folder", "data.image_shape=[28, 28, 4]"],
     "data.image_shape = [28, 28, 4]: image_folder converts images to grayscale or RGB; expected 1 or 3 channels"),
])
def test_bad_data_params_fail_in_one_line_naming_the_key(tmp_path, overrides, expected):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    with pytest.raises(ConfigError) as err:
        load_config(params, overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# mnist


def write_small_idx_files(directory: Path) -> dict[str, np.ndarray]:
    """The four IDX files with tiny content; returns stem -> array written."""
    arrays = {
        "train-images-idx3-ubyte": small_images(4, 3, 3),
        "train-labels-idx1-ubyte": np.array([7, 1, 7, 1], dtype=np.uint8),
        "t10k-images-idx3-ubyte": small_images(2, 3, 3)[::-1],
        "t10k-labels-idx1-ubyte": np.array([1, 7], dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx_gz(directory / f"{stem}.gz", array)
    return arrays


def trust_files(monkeypatch, directory: Path, **changes) -> None:
    """Make the mnist table expect the md5s of the .gz files in `directory` (tests only)."""
    stems = fetch.IDX_SOURCES["mnist"].gz_md5
    md5 = {stem: hashlib.md5((directory / f"{stem}.gz").read_bytes()).hexdigest() for stem in stems}
    spec = dataclasses.replace(fetch.IDX_SOURCES["mnist"], gz_md5=md5, **changes)
    monkeypatch.setitem(fetch.IDX_SOURCES, "mnist", spec)


def test_mnist_from_idx_files_verified_by_gz_md5(tmp_path, monkeypatch):
    arrays = write_small_idx_files(tmp_path / "mnist")
    trust_files(monkeypatch, tmp_path / "mnist")
    ds = fetch_dataset(DataConfig(source="mnist", dir=str(tmp_path / "mnist"), download=False))
    assert ds.class_names == [str(d) for d in range(10)]
    assert ds.train_x.shape == (4, 3, 3, 1) and ds.test_x.shape == (2, 3, 3, 1)
    np.testing.assert_array_equal(ds.train_x[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_y, [1, 7])
    for record in ds.manifest["files"]:
        stem = record["name"].removesuffix(".gz")
        gz = (tmp_path / "mnist" / record["name"]).read_bytes()
        assert record["verified_by"] == "gz_md5" and record["md5"] == hashlib.md5(gz).hexdigest()
        assert record["content_sha256"] == hashlib.sha256(idx_bytes(arrays[stem])).hexdigest()
    save_raw(ds, tmp_path / "raw")
    prepared = preprocess(load_raw(tmp_path / "raw"), PreprocessConfig(val_fraction=0.5), seed=0)
    assert prepared.input_shape == (3, 3, 1) and len(prepared.train_x) == len(prepared.val_x) == 2
    assert prepared.test_x.shape == (2, 3, 3, 1) and prepared.class_names == ds.class_names


def test_mnist_md5_mismatch_fails_before_decompressing(tmp_path):
    write_small_idx_files(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")  # gunzip would fail differently
    with pytest.raises(PipelineError) as err:
        fetch_dataset(DataConfig(source="mnist", dir=str(tmp_path), download=False))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'train-images-idx3-ubyte.gz'}: md5 of the .gz file is ")
    assert hashlib.md5(b"not gzip at all").hexdigest() in message
    assert "expected f68b3c2dcbeaaa9fbdd348bbdeb94873" in message and "re-compressed" in message


def test_mnist_regzipped_file_fails_its_md5(tmp_path, monkeypatch):
    arrays = write_small_idx_files(tmp_path)
    trust_files(monkeypatch, tmp_path)
    name = "t10k-labels-idx1-ubyte.gz"
    (tmp_path / name).write_bytes(gzip.compress(idx_bytes(arrays[name.removesuffix(".gz")]), mtime=1))
    with pytest.raises(PipelineError, match=f"{name}: md5 of the .gz file is .* re-compressed"):
        fetch_dataset(DataConfig(source="mnist", dir=str(tmp_path), download=False))


def test_mnist_missing_files_say_where_to_get_them(tmp_path):
    with pytest.raises(PipelineError) as err:
        fetch_dataset(DataConfig(source="mnist", dir=str(tmp_path), download=False))
    message = str(err.value)
    assert f"train-images-idx3-ubyte.gz not found in {tmp_path}" in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in message and "data.download" in message


def test_mnist_download_falls_back_to_the_next_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_small_idx_files(mirror)
    trust_files(monkeypatch, mirror, urls=((tmp_path / "gone").as_uri() + "/", mirror.as_uri() + "/"))
    ds = fetch_dataset(DataConfig(source="mnist", dir=str(tmp_path / "empty"), download_dir=str(tmp_path / "cache")))
    for record in ds.manifest["files"]:
        assert record["url"] == mirror.as_uri() + "/" + record["name"]
        assert record["path"] == str(tmp_path / "cache" / "mnist" / record["name"])
        assert record["verified_by"] == "gz_md5"


def test_idx_source_table_has_one_hash_per_file():
    for spec in fetch.IDX_SOURCES.values():
        for stems in fetch.IDX_SPLITS.values():
            for stem in stems:
                assert (stem in spec.content_sha256) != (stem in spec.gz_md5), (spec.folder, stem)


# ---------------------------------------------------------------------------------------------
# cifar10

CIFAR = "cifar-10-python.tar.gz"


def cifar_splits():
    train = [(cifar_images(2, seed=i), [i % 2, (i + 1) % 2]) for i in range(5)]  # classes 0, 1: 5 images each
    test = (cifar_images(3, seed=9), [1, 0, 9])
    return train, test


def write_cifar(directory: Path, members: dict | None = None, extra=()) -> Path:
    if members is None:
        members = official_members(*cifar_splits())
    return write_tarball(directory / CIFAR, members, list(extra))


def trust_tarball(monkeypatch, path: Path, **changes) -> None:
    """Make the cifar10 table expect this test tarball's sha256 (tests only)."""
    spec = dataclasses.replace(fetch.ARCHIVE_SOURCES["cifar10"], sha256=sha256_file(path), **changes)
    monkeypatch.setitem(fetch.ARCHIVE_SOURCES, "cifar10", spec)


def cifar_config(directory: Path, **extra) -> DataConfig:
    return DataConfig(source="cifar10", dir=str(directory), download=False, **extra)


def test_cifar10_from_a_real_format_tarball(tmp_path, monkeypatch):
    train, test = cifar_splits()
    trust_tarball(monkeypatch, write_cifar(tmp_path))
    ds = fetch_dataset(cifar_config(tmp_path))
    assert ds.class_names == CIFAR_CLASSES
    assert ds.train_x.shape == (10, 32, 32, 3) and ds.train_x.dtype == np.uint8 and ds.train_x.flags.c_contiguous
    np.testing.assert_array_equal(ds.train_x, np.concatenate([x for x, _ in train]))  # CHW rows -> HWC
    np.testing.assert_array_equal(ds.train_y, np.concatenate([y for _, y in train]))
    np.testing.assert_array_equal(ds.test_x, test[0])
    assert ds.test_y.dtype == np.int64 and ds.test_y.tolist() == [1, 0, 9]
    (record,) = ds.manifest["files"]
    assert record["role"] == "archive" and record["sha256"] == sha256_file(tmp_path / CIFAR)
    assert record["members"][-1] == "cifar-10-batches-py/batches.meta" and "url" not in record
    assert ds.manifest["counts"] == {"train": 10, "test": 3, "unlabeled": 0}
    assert ds.manifest["image_shape"] == [32, 32, 3]
    save_raw(ds, tmp_path / "raw")
    loaded = load_raw(tmp_path / "raw")
    np.testing.assert_array_equal(loaded.train_x, ds.train_x)
    assert dataset_digest(loaded) == dataset_digest(ds)
    config = PreprocessConfig(image_size=(28, 28), channels="grayscale", val_fraction=0.4)
    prepared = preprocess(loaded, config, seed=0)
    assert prepared.input_shape == (28, 28, 1)
    assert prepared.train_x.shape == (6, 28, 28, 1) and prepared.val_x.shape == (4, 28, 28, 1)
    assert prepared.test_x.shape == (3, 28, 28, 1) and prepared.train_x.dtype == np.uint8
    assert sorted(np.bincount(prepared.val_y).tolist()) == [2, 2]


def test_cifar10_hash_mismatch_fails_before_the_archive_is_opened(tmp_path, monkeypatch):
    path = write_cifar(tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("an unverified archive was opened or unpickled")

    monkeypatch.setattr(fetch, "read_tar_members", must_not_run)
    monkeypatch.setattr(fetch, "_unpickle", must_not_run)
    with pytest.raises(PipelineError) as err:
        fetch_dataset(cifar_config(tmp_path))
    message = str(err.value)
    assert message == (f"{path}: sha256 is {sha256_file(path)}, expected "
                       "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce; the file is corrupt "
                       f"or not the official {CIFAR}: delete or replace it")


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path, monkeypatch):
    members = official_members(*cifar_splits())
    members["cifar-10-batches-py/data_batch_2"] = pickle.dumps({b"data": Gadget()}, protocol=3)
    trust_tarball(monkeypatch, write_cifar(tmp_path, members))
    with pytest.raises(PipelineError, match=r"member 'cifar-10-batches-py/data_batch_2' is not a readable pickle "
                                            r"\(refused to load the global cifar_format.gadget"):
        fetch_dataset(cifar_config(tmp_path))
    assert GADGET_CALLS == []


@pytest.mark.parametrize("member, problem", [
    (file_member("/tmp/cifar-escape", b"x"), "has an absolute path"),
    (file_member("cifar-10-batches-py/../../cifar-escape", b"x"), "has a '..' component"),
    (special_member("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd"), "is a link to '/etc/passwd'"),
    (special_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "cifar-10-batches-py/readme.html"),
     "is a link to 'cifar-10-batches-py/readme.html'"),
    (special_member("cifar-10-batches-py/dev", tarfile.CHRTYPE), "is a device, FIFO or other special file"),
], ids=["absolute", "dotdot", "symlink", "hardlink", "device"])
def test_cifar10_refuses_members_that_escape(tmp_path, monkeypatch, member, problem):
    path = write_cifar(tmp_path / "in", extra=[member])
    trust_tarball(monkeypatch, path)
    with pytest.raises(PipelineError) as err:
        fetch_dataset(cifar_config(tmp_path / "in"))
    assert str(err.value) == (f"{path}: member {member[0].name!r} {problem}; refusing the archive, whose members "
                              "must be plain files and folders inside it")
    assert sorted(p.name for p in tmp_path.rglob("*")) == [CIFAR, "in"]  # nothing extracted anywhere


def replace_member(name: str, data: bytes):
    def change(members):
        members[f"cifar-10-batches-py/{name}"] = data
    return change


def drop_member(name: str):
    def change(members):
        del members[f"cifar-10-batches-py/{name}"]
    return change


BAD_CIFAR = [
    pytest.param(drop_member("test_batch"), "no member 'cifar-10-batches-py/test_batch'", id="missing-member"),
    pytest.param(replace_member("data_batch_3", b"\x80\x03junk"), "member 'cifar-10-batches-py/data_batch_3' is "
                 "not a readable pickle", id="corrupt-pickle"),
    pytest.param(replace_member("data_batch_1", pickle.dumps([1, 2], protocol=3)),
                 "data_batch_1: expected a dict with keys b'data' and b'labels', found list", id="not-a-dict"),
    pytest.param(replace_member("data_batch_1", pickle.dumps({b"data": np.zeros((2, 3000), np.uint8),
                                                              b"labels": [0, 1]}, protocol=3)),
                 "data_batch_1: b'data' is uint8 (2, 3000); expected a uint8 array of shape (N, 3072)",
                 id="wrong-row-size"),
    pytest.param(replace_member("test_batch", batch_bytes(cifar_images(2, 0), [0])),
                 "test_batch: b'labels' holds (1,) int64 values for 2 images", id="label-count"),
    pytest.param(replace_member("data_batch_5", batch_bytes(cifar_images(2, 0), [0, 10])),
                 "data_batch_5: label 10 at index 1; expected 0..9", id="label-range"),
    pytest.param(replace_member("batches.meta", pickle.dumps({b"label_names": []}, protocol=3)),
                 "batches.meta: expected a non-empty list of class names under b'label_names'", id="no-names"),
]


@pytest.mark.parametrize("change, expected", BAD_CIFAR)
def test_cifar10_bad_content_of_a_verified_archive(tmp_path, monkeypatch, change, expected):
    members = official_members(*cifar_splits())
    change(members)
    path = write_cifar(tmp_path, members)
    trust_tarball(monkeypatch, path)
    with pytest.raises(PipelineError) as err:
        fetch_dataset(cifar_config(tmp_path))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message, message


def test_cifar10_not_a_tarball(tmp_path, monkeypatch):
    path = tmp_path / CIFAR
    path.write_bytes(gzip.compress(b"not a tar archive" * 100))
    trust_tarball(monkeypatch, path)
    with pytest.raises(PipelineError, match=f"^{path}: not a readable .tar.gz archive"):
        fetch_dataset(cifar_config(tmp_path))


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(PipelineError) as err:
        fetch_dataset(cifar_config(tmp_path))
    message = str(err.value)
    assert f"{CIFAR} not found in {tmp_path} and data.download is false" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message


def test_cifar10_download_into_download_dir(tmp_path, monkeypatch):
    mirror = write_cifar(tmp_path / "mirror").parent
    trust_tarball(monkeypatch, mirror / CIFAR, urls=((tmp_path / "gone").as_uri() + "/", mirror.as_uri() + "/"))
    ds = fetch_dataset(DataConfig(source="cifar10", dir=str(tmp_path / "empty"), download_dir=str(tmp_path / "dl")))
    (record,) = ds.manifest["files"]
    assert record["url"] == mirror.as_uri() + "/" + CIFAR
    assert record["path"] == str(tmp_path / "dl" / "cifar10" / CIFAR)
    assert ds.train_x.shape == (10, 32, 32, 3)



# ---------------------------------------------------------------------------------------------
# csv


def test_csv_with_string_labels_and_unlabeled_test(tmp_path):
    labels = ["cat", "dog", "ant", "dog"]
    ids = [10, 3, 7, 1]
    train = write_csv(tmp_path / "train.csv", ["Id", "Label", *PIXELS],
                      [[i, lab, *pixel_values(r)] for r, (i, lab) in enumerate(zip(ids, labels))])
    test_rows = [[i, *pixel_values(10 + r)] for r, i in enumerate([5, 2, 9])]
    test = write_csv(tmp_path / "test.csv", ["Id", *PIXELS], test_rows)
    ds = fetch_dataset(csv_config(train, test))
    assert ds.class_names == ["ant", "cat", "dog"]
    np.testing.assert_array_equal(ds.train_y, [1, 2, 0, 2])
    assert ds.train_y.dtype == np.int64
    assert ds.train_x.shape == (4, 4, 4, 1) and ds.train_x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_x[1].ravel(), pixel_values(1))  # row-major HWC
    assert ds.test_x is None and ds.test_y is None
    assert ds.unlabeled_ids.dtype == np.int64
    np.testing.assert_array_equal(ds.unlabeled_ids, [5, 2, 9])
    np.testing.assert_array_equal(ds.unlabeled_x[2].ravel(), pixel_values(12))
    manifest = ds.manifest
    assert manifest["counts"] == {"train": 4, "test": 0, "unlabeled": 3}
    assert manifest["image_shape"] == [4, 4, 1] and manifest["class_names"] == ["ant", "cat", "dog"]
    assert [(f["role"], f["name"]) for f in manifest["files"]] == [("train", "train.csv"), ("unlabeled", "test.csv")]
    assert manifest["files"][0]["sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()


def test_csv_integer_labels_sort_numerically(tmp_path):
    labels = [10, 2, 2, 33, -1]
    train = write_csv(tmp_path / "train.csv", ["Id", "Label", *PIXELS],
                      [[r, lab, *pixel_values(r)] for r, lab in enumerate(labels)])
    ds = fetch_dataset(csv_config(train))
    assert ds.class_names == ["-1", "2", "10", "33"]
    np.testing.assert_array_equal(ds.train_y, [2, 1, 1, 3, 0])
    assert ds.unlabeled_x is None and ds.unlabeled_ids is None


def test_csv_string_ids_custom_columns_any_order(tmp_path):
    train = write_csv(tmp_path / "train.csv", [*PIXELS[:3], "label", *PIXELS[3:], "ImageId"],
                      [[*pixel_values(r)[:3], "x", *pixel_values(r)[3:], f"img{r}"] for r in range(2)])
    test = write_csv(tmp_path / "test.csv", ["ImageId", *PIXELS], [["b", *pixel_values(0)], ["007", *pixel_values(1)]])
    ds = fetch_dataset(csv_config(train, test, id_column="ImageId", label_column="label"))
    np.testing.assert_array_equal(ds.train_x[1].ravel(), pixel_values(1))
    assert ds.unlabeled_ids.dtype.kind == "U"
    assert ds.unlabeled_ids.tolist() == ["b", "007"]


def header_and_rows():
    header = ["Id", "Label", *PIXELS]
    rows = [[r + 1, ["dog", "cat"][r % 2], *pixel_values(r)] for r in range(4)]
    test_header = ["Id", *PIXELS]
    test_rows = [[r + 100, *pixel_values(r)] for r in range(3)]
    return header, rows, test_header, test_rows


def drop_last_pixel(h, rows, th, trows):
    h.pop()
    for row in rows:
        row.pop()


def set_cell(which: str, row: int, col: int, value):
    def mutate(h, rows, th, trows):
        (rows if which == "train" else trows)[row][col] = value
    return mutate


def rename(which: str, col: int, name: str):
    def mutate(h, rows, th, trows):
        (h if which == "train" else th)[col] = name
    return mutate


def swap_test_pixels(h, rows, th, trows):
    th[1], th[2] = th[2], th[1]


def label_column_in_test(h, rows, th, trows):
    th.insert(1, "Label")
    for row in trows:
        row.insert(1, "cat")


def drop_test_pixel(h, rows, th, trows):
    th.pop()
    for row in trows:
        row.pop()


def extra_field(h, rows, th, trows):
    rows[1].append(5)


def no_rows(h, rows, th, trows):
    rows.clear()


def blank_line(h, rows, th, trows):
    rows.insert(1, [])


BAD_CSV = [
    pytest.param(rename("train", 0, "ID"), "train.csv", ["no column 'Id' (data.csv.id_column)"], id="no-id-column"),
    pytest.param(rename("train", 1, "label"), "train.csv", ["no column 'Label' (data.csv.label_column)"],
                 id="no-label-column"),
    pytest.param(drop_last_pixel, "train.csv", ["15 pixel columns", "expected 16 = 4*4*1", "[4, 4, 1]"],
                 id="pixel-count"),
    pytest.param(set_cell("train", 1, 4, "abc"), "train.csv", ["line 3, column 'pixel2'", "'abc' is not a number"],
                 id="non-numeric-pixel"),
    pytest.param(set_cell("train", 1, 3, "true"), "train.csv", ["line 3, column 'pixel1'", "'true' is not a number"],
                 id="boolean-pixel"),
    pytest.param(set_cell("train", 2, 2, ""), "train.csv", ["line 4, column 'pixel0'", "empty cell"],
                 id="empty-pixel"),
    pytest.param(set_cell("train", 0, 17, 256), "train.csv", ["line 2, column 'pixel15'", "256 is out of range",
                                                               "0..255"], id="pixel-above-255"),
    pytest.param(set_cell("train", 3, 5, -1), "train.csv", ["line 5, column 'pixel3'", "-1 is out of range"],
                 id="negative-pixel"),
    pytest.param(set_cell("train", 1, 6, 1.5), "train.csv", ["line 3, column 'pixel4'", "1.5 is not an integer"],
                 id="fractional-pixel"),
    pytest.param(set_cell("train", 1, 1, ""), "train.csv", ["line 3, column 'Label'", "empty label"],
                 id="empty-label"),
    pytest.param(set_cell("train", 2, 0, ""), "train.csv", ["line 4, column 'Id'", "empty id"], id="empty-id"),
    pytest.param(set_cell("train", 3, 0, 2), "train.csv", ["line 5, column 'Id'", "duplicate id '2'",
                                                          "first on line 3"], id="duplicate-train-id"),
    pytest.param(set_cell("test", 2, 0, 100), "test.csv", ["line 4, column 'Id'", "duplicate id '100'",
                                                          "first on line 2"], id="duplicate-test-id"),
    pytest.param(rename("test", 0, "id"), "test.csv", ["no column 'Id' (data.csv.id_column)"], id="no-test-id"),
    pytest.param(rename("test", 3, "px2"), "test.csv", ["pixel columns differ", "'px2'", "train.csv"],
                 id="test-renamed-pixel"),
    pytest.param(label_column_in_test, "test.csv", ["pixel columns differ", "column 'Label'"],
                 id="test-with-label"),
    pytest.param(drop_test_pixel, "test.csv", ["pixel columns differ", "pixel column 'pixel15'", "missing"],
                 id="test-missing-pixel"),
    pytest.param(swap_test_pixels, "test.csv", ["pixel column 1 is 'pixel1' where train.csv has 'pixel0'"],
                 id="test-pixel-order"),
    pytest.param(set_cell("test", 1, 16, "x"), "test.csv", ["line 3, column 'pixel15'", "'x' is not a number"],
                 id="test-non-numeric-pixel"),
    pytest.param(extra_field, "train.csv", ["line 3"], id="extra-field"),
    pytest.param(no_rows, "train.csv", ["no data rows"], id="header-only"),
    pytest.param(blank_line, "train.csv", ["line 3", "empty cell"], id="blank-line"),
]


@pytest.mark.parametrize("mutate, bad_file, expected", BAD_CSV)
def test_csv_bad_input(tmp_path, mutate, bad_file, expected):
    header, rows, test_header, test_rows = header_and_rows()
    mutate(header, rows, test_header, test_rows)
    train = write_csv(tmp_path / "train.csv", header, rows)
    test = write_csv(tmp_path / "test.csv", test_header, test_rows)
    with pytest.raises(PipelineError) as err:
        fetch_dataset(csv_config(train, test))
    message = str(err.value)
    assert message.startswith(str(tmp_path / bad_file)), message
    assert "\n" not in message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("missing", ["train", "test"])
def test_csv_missing_file(tmp_path, missing):
    header, rows, test_header, test_rows = header_and_rows()
    paths = {"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"}
    if missing != "train":
        write_csv(paths["train"], header, rows)
    if missing != "test":
        write_csv(paths["test"], test_header, test_rows)
    with pytest.raises(PipelineError, match=f"^{paths[missing]}: file not found"):
        fetch_dataset(csv_config(paths["train"], paths["test"]))


def test_csv_empty_file(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("")
    with pytest.raises(PipelineError, match=f"^{path}: empty file"):
        fetch_dataset(csv_config(path))


def test_csv_train_not_set():
    with pytest.raises(PipelineError, match="data.csv.train is not set"):
        fetch_dataset(csv_config(None))


# ---------------------------------------------------------------------------------------------
# image_folder


def solid(size: tuple[int, int], color, mode: str = "RGB") -> Image.Image:
    """A (width, height) image of one color."""
    return Image.new(mode, size, color)


def pattern(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def write_image_folders(root: Path) -> dict[str, Path]:
    """train/{cat,dog} and unlabeled/ with PNG and JPEG files of mixed modes and sizes."""
    paths = {
        "cat/b.png": save(Image.fromarray(pattern(4, 4, 1)), root / "train" / "cat" / "b.png"),  # right size: exact
        "cat/a.PNG": save(Image.fromarray(pattern(4, 4, 2)), root / "train" / "cat" / "a.PNG"),
        "dog/x.jpg": save(solid((9, 7), (200, 30, 60)), root / "train" / "dog" / "x.jpg", quality=95),
        "dog/y.png": save(solid((3, 5), (10, 20, 30, 40), "RGBA"), root / "train" / "dog" / "y.png"),
        "dog/z.jpeg": save(solid((4, 4), 128, "L"), root / "train" / "dog" / "z.jpeg"),
        "u/b.png": save(Image.fromarray(pattern(4, 4, 3)), root / "unlabeled" / "b.png"),
        "u/a.jpg": save(solid((4, 6), (0, 0, 255)), root / "unlabeled" / "a.jpg"),
    }
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are skipped
    (root / "train" / "dog" / ".hidden.txt").write_text("skipped")
    return paths


def folder_config(root: Path, shape=(4, 4, 3), unlabeled: bool = True, **options) -> DataConfig:
    spec = ImageFolderConfig(train=str(root / "train"), unlabeled=str(root / "unlabeled") if unlabeled else None,
                             **options)
    return DataConfig(source="image_folder", image_shape=shape, image_folder=spec)


def test_image_folder_reads_classes_and_unlabeled_images(tmp_path):
    paths = write_image_folders(tmp_path)
    ds = fetch_dataset(folder_config(tmp_path))
    assert ds.class_names == ["cat", "dog"]
    assert ds.train_y.dtype == np.int64 and ds.train_y.tolist() == [0, 0, 1, 1, 1]
    assert ds.train_x.shape == (5, 4, 4, 3) and ds.train_x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_x[0], pattern(4, 4, 2))  # a.PNG before b.png: sorted names
    np.testing.assert_array_equal(ds.train_x[1], pattern(4, 4, 1))  # same size, lossless: untouched
    assert np.abs(ds.train_x[2].astype(int) - [200, 30, 60]).max() <= 3  # JPEG, resized from 9x7
    assert (ds.train_x[3] == [10, 20, 30]).all()  # RGBA: alpha dropped, resized from 3x5
    assert (ds.train_x[4] == 128).all()  # L -> RGB
    assert ds.test_x is None
    assert ds.unlabeled_ids.tolist() == ["a.jpg", "b.png"]
    np.testing.assert_array_equal(ds.unlabeled_x[1], pattern(4, 4, 3))
    train, unlabeled = ds.manifest["files"]
    assert (train["role"], train["images"], train["resized"]) == ("train", 5, 2)
    assert (unlabeled["role"], unlabeled["images"], unlabeled["resized"]) == ("unlabeled", 2, 1)
    assert train["bytes"] == sum(p.stat().st_size for k, p in paths.items() if not k.startswith("u/"))
    assert ds.manifest["counts"] == {"train": 5, "test": 0, "unlabeled": 2}
    assert ds.manifest["image_shape"] == [4, 4, 3]


def test_image_folder_through_save_load_and_preprocess(tmp_path):
    write_image_folders(tmp_path)
    ds = fetch_dataset(folder_config(tmp_path, shape=(6, 5, 1)))
    assert ds.train_x.shape == (5, 6, 5, 1) and (ds.train_x[4] == 128).all()
    save_raw(ds, tmp_path / "raw")
    loaded = load_raw(tmp_path / "raw")
    assert loaded.unlabeled_ids.tolist() == ["a.jpg", "b.png"] and loaded.unlabeled_ids.dtype.kind == "U"
    np.testing.assert_array_equal(loaded.unlabeled_x, ds.unlabeled_x)
    assert dataset_digest(loaded) == dataset_digest(ds)
    prepared = preprocess(loaded, PreprocessConfig(val_fraction=0.4), seed=0)
    assert prepared.input_shape == (6, 5, 1) and prepared.class_names == ["cat", "dog"]
    assert len(prepared.train_x) == 3 and len(prepared.val_x) == 2
    assert prepared.stats["counts"]["unlabeled"] == 2


def test_image_folder_grayscale_conversion_and_16_bit_png(tmp_path):
    rgb = pattern(4, 4, 5)
    save(Image.fromarray(rgb), tmp_path / "train" / "a" / "rgb.png")
    wide = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)
    save(Image.fromarray(wide), tmp_path / "train" / "b" / "16bit.png")
    ds = fetch_dataset(folder_config(tmp_path, shape=(4, 4, 1), unlabeled=False))
    np.testing.assert_array_equal(ds.train_x[0, ..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    np.testing.assert_array_equal(ds.train_x[1, ..., 0], wide >> 8)  # scaled, not clipped at 255
    assert ds.unlabeled_x is None


def test_image_folder_without_resize_requires_the_size(tmp_path):
    write_image_folders(tmp_path)
    with pytest.raises(PipelineError) as err:
        fetch_dataset(folder_config(tmp_path, resize=False))
    assert str(err.value) == (f"{tmp_path / 'train' / 'dog' / 'x.jpg'}: 7x9 pixels (height x width), expected 4x4 "
                              "for data.image_shape [4, 4, 3]; set data.image_folder.resize=true to resize")
    for name in ("x.jpg", "y.png"):
        (tmp_path / "train" / "dog" / name).unlink()
    (tmp_path / "unlabeled" / "a.jpg").unlink()
    ds = fetch_dataset(folder_config(tmp_path, resize=False))
    assert ds.train_x.shape == (3, 4, 4, 3) and ds.manifest["files"][0]["resized"] == 0


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


BAD_FOLDERS = [
    pytest.param(lambda root: truncate(root / "train" / "cat" / "b.png"), "train/cat/b.png",
                 ["not a readable PNG or JPEG image", "fix or remove the file"], id="truncated-png"),
    pytest.param(lambda root: (root / "unlabeled" / "a.jpg").write_text("hello"), "unlabeled/a.jpg",
                 ["not a readable PNG or JPEG image", "cannot identify image file"], id="text-as-jpeg"),
    pytest.param(lambda root: save(solid((4, 4), 1, "P"), root / "train" / "cat" / "gif.png", format="GIF"),
                 "train/cat/gif.png", ["not a readable PNG or JPEG image"], id="gif-named-png"),
    pytest.param(lambda root: (root / "train" / "bird").mkdir(), "train/bird",
                 ["no .png, .jpg, .jpeg files", "at least one image in each class folder"], id="empty-class"),
    pytest.param(lambda root: (root / "train" / "cat" / "notes.txt").write_text("x"), "train/cat/notes.txt",
                 ["expected only .png, .jpg, .jpeg files in"], id="other-file"),
    pytest.param(lambda root: (root / "train" / "cat" / "more").mkdir(), "train/cat/more",
                 ["sub-folders are not read"], id="nested-folder"),
    pytest.param(lambda root: shutil.copy(root / "train" / "cat" / "b.png", root / "train" / "stray.png"),
                 "train/stray.png", ["not in a class sub-folder"], id="image-outside-classes"),
    pytest.param(lambda root: shutil.rmtree(root / "train" / "dog"), "train",
                 ["class sub-folders: only 'cat'", "at least two classes"], id="one-class"),
    pytest.param(lambda root: [shutil.rmtree(root / "train" / c) for c in ("cat", "dog")], "train",
                 ["class sub-folders: none (data.image_folder.train)"], id="no-classes"),
    pytest.param(lambda root: shutil.rmtree(root / "train"), "train",
                 ["folder not found (data.image_folder.train)"], id="no-train-folder"),
    pytest.param(lambda root: [p.unlink() for p in (root / "unlabeled").iterdir()], "unlabeled",
                 ["no .png, .jpg, .jpeg files (data.image_folder.unlabeled)"], id="empty-unlabeled"),
    pytest.param(lambda root: [shutil.rmtree(root / "unlabeled"), (root / "unlabeled").write_text("")], "unlabeled",
                 ["not a folder (data.image_folder.unlabeled)"], id="unlabeled-is-a-file"),
]


@pytest.mark.parametrize("mutate, bad_path, expected", BAD_FOLDERS)
def test_image_folder_bad_input(tmp_path, mutate, bad_path, expected):
    write_image_folders(tmp_path)
    mutate(tmp_path)
    with pytest.raises(PipelineError) as err:
        fetch_dataset(folder_config(tmp_path))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / bad_path}: ") and "\n" not in message, message
    for part in expected:
        assert part in message, message


def test_image_folder_train_not_set():
    with pytest.raises(PipelineError, match="data.image_folder.train is not set"):
        fetch_dataset(DataConfig(source="image_folder"))


def test_image_folder_digest_follows_content_and_class_names(tmp_path):
    write_image_folders(tmp_path / "a")
    first = fetch_dataset(folder_config(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert dataset_digest(fetch_dataset(folder_config(tmp_path / "b"))) == dataset_digest(first)
    (tmp_path / "b" / "train" / "dog").rename(tmp_path / "b" / "train" / "wolf")
    assert dataset_digest(fetch_dataset(folder_config(tmp_path / "b"))) != dataset_digest(first)



# ---------------------------------------------------------------------------------------------
# digits


def test_digits():
    ds = fetch_dataset(DataConfig(source="digits"))
    assert ds.train_x.shape == (1437, 8, 8, 1) and ds.test_x.shape == (360, 8, 8, 1)
    assert ds.train_x.dtype == np.uint8 and ds.test_y.dtype == np.int64
    assert ds.train_x.min() == 0 and ds.train_x.max() == 255
    assert ds.class_names == [str(d) for d in range(10)]
    assert np.bincount(ds.test_y).min() >= 35  # stratified: ~36 of each digit's ~180
    assert ds.manifest["counts"] == {"train": 1437, "test": 360, "unlabeled": 0}
    assert ds.manifest["image_shape"] == [8, 8, 1]
    again = fetch_dataset(DataConfig(source="digits"))
    np.testing.assert_array_equal(again.test_y, ds.test_y)
    assert dataset_digest(again) == dataset_digest(ds)


# ---------------------------------------------------------------------------------------------
# output directory and digest


def synthetic(ids: np.ndarray, seed: int = 0) -> RawDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(10, 4, 4, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, size=10).astype(np.int64)
    files = [{"role": "train", "name": "t.csv", "path": "t.csv", "sha256": f"{seed:064x}", "bytes": 1}]
    return fetch._dataset("csv", files, ["a", "b", "c"], (images[:6], labels[:6]),
                          test=(images[6:8], labels[6:8]), unlabeled=(images[8:], ids))


@pytest.mark.parametrize("ids", [np.array([4, 2], dtype=np.int64), np.array(["b", "007"])], ids=["int", "str"])
def test_save_and_load_round_trip(tmp_path, ids):
    ds = synthetic(ids)
    save_raw(ds, tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [
        "manifest.json", "test.npz", "train.npz", "unlabeled.npz",
    ]
    loaded = load_raw(tmp_path / "raw")
    for name in ("train_x", "train_y", "test_x", "test_y", "unlabeled_x", "unlabeled_ids"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(ds, name))
        assert getattr(loaded, name).dtype == getattr(ds, name).dtype
    assert loaded.class_names == ds.class_names and loaded.manifest == ds.manifest
    assert dataset_digest(loaded) == dataset_digest(ds)


def test_save_without_optional_splits(tmp_path):
    full = synthetic(np.array([1, 2]))
    ds = dataclasses.replace(full, test_x=None, test_y=None, unlabeled_x=None, unlabeled_ids=None)
    save_raw(ds, tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["manifest.json", "train.npz"]
    loaded = load_raw(tmp_path / "raw")
    assert loaded.test_x is None and loaded.unlabeled_ids is None


def fail_on_second_savez(monkeypatch):
    real = np.savez
    calls = []

    def savez(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "savez", savez)


def test_failed_save_leaves_no_output(tmp_path, monkeypatch):
    fail_on_second_savez(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_raw(synthetic(np.array([1, 2])), tmp_path / "raw")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_previous_output_unchanged(tmp_path, monkeypatch):
    old = synthetic(np.array([1, 2]), seed=1)
    save_raw(old, tmp_path / "raw")
    before = {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()}
    fail_on_second_savez(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_raw(synthetic(np.array([1, 2]), seed=2), tmp_path / "raw")
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_load_raw_missing_output(tmp_path):
    with pytest.raises(PipelineError, match=r"manifest.json: not found; expected the fetch stage's output"):
        load_raw(tmp_path / "raw")


def test_digest_is_stable_and_ignores_paths(tmp_path):
    header, rows, _, _ = header_and_rows()
    first = fetch_dataset(csv_config(write_csv(tmp_path / "a.csv", header, rows)))
    (tmp_path / "copy").mkdir()
    copy = fetch_dataset(csv_config(shutil.copy(tmp_path / "a.csv", tmp_path / "copy" / "b.csv")))
    digest = dataset_digest(first)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert digest == dataset_digest(first) == dataset_digest(first.manifest) == dataset_digest(copy)


def test_digest_changes_with_the_data(tmp_path):
    header, rows, _, _ = header_and_rows()
    first = fetch_dataset(csv_config(write_csv(tmp_path / "a.csv", header, rows)))
    rows[0][5] = 99
    changed = fetch_dataset(csv_config(write_csv(tmp_path / "b.csv", header, rows)))
    assert dataset_digest(changed) != dataset_digest(first)


def test_digest_uses_content_hash_over_gzip_hash():
    files = [{"role": "train_images", "name": "x.gz", "path": "/a/x.gz",
              "sha256": "1" * 64, "content_sha256": "c" * 64}]
    manifest = {"source": "fashion_mnist", "image_shape": [28, 28, 1], "files": files}
    regzipped = {**manifest, "files": [{**files[0], "path": "/b/x.gz", "sha256": "2" * 64, "url": "http://m/x.gz"}]}
    other_content = {**manifest, "files": [{**files[0], "content_sha256": "d" * 64}]}
    assert dataset_digest(regzipped) == dataset_digest(manifest)
    assert dataset_digest(other_content) != dataset_digest(manifest)
    assert dataset_digest({**manifest, "image_shape": [28, 28, 3]}) != dataset_digest(manifest)


# an up-to-date output, checked without decompressing (the fetch stage then leaves it as it is)


def trust_fashion_files(monkeypatch, directory: Path) -> None:
    """Make the fashion_mnist table expect the content of the .gz files in `directory` (tests only)."""
    spec = fetch.IDX_SOURCES["fashion_mnist"]
    content = {stem: hashlib.sha256(gzip.decompress((directory / f"{stem}.gz").read_bytes())).hexdigest()
               for stem in spec.content_sha256}
    monkeypatch.setitem(fetch.IDX_SOURCES, "fashion_mnist", dataclasses.replace(spec, content_sha256=content))


def no_gunzip(raw, path):
    raise AssertionError(f"{path} decompressed")


def test_an_up_to_date_output_is_recognised_without_decompressing(tmp_path, monkeypatch):
    write_small_fashion_files(tmp_path / "src")
    trust_fashion_files(monkeypatch, tmp_path / "src")
    cfg, out = fashion_config(tmp_path / "src"), tmp_path / "raw"
    assert fetch.up_to_date(cfg, out) is None  # nothing there yet
    dataset = fetch_dataset(cfg)
    fetch.save_raw(dataset, out)
    monkeypatch.setattr(fetch, "_gunzip", no_gunzip)
    assert fetch.up_to_date(cfg, out) == dataset.manifest


def test_an_up_to_date_mnist_output_is_recognised_by_its_gz_md5(tmp_path, monkeypatch):
    write_small_idx_files(tmp_path / "mnist")
    trust_files(monkeypatch, tmp_path / "mnist")
    cfg, out = DataConfig(source="mnist", dir=str(tmp_path / "mnist"), download=False), tmp_path / "raw"
    dataset = fetch_dataset(cfg)
    fetch.save_raw(dataset, out)
    monkeypatch.setattr(fetch, "_gunzip", no_gunzip)
    assert fetch.up_to_date(cfg, out) == dataset.manifest
    raw = fetch.load_raw(out)
    fetch.save_arrays(out / fetch.TEST_FILE, x=raw.test_x, y=raw.test_y[::-1].copy())  # the labels swapped
    assert fetch.up_to_date(cfg, out) is None


def change_pixel(src: Path, out: Path) -> None:
    raw = fetch.load_raw(out)
    raw.train_x[0, 0, 0, 0] ^= 1
    fetch.save_arrays(out / fetch.TRAIN_FILE, x=raw.train_x, y=raw.train_y)


def regzip(src: Path, out: Path) -> None:
    path = src / "t10k-images-idx3-ubyte.gz"
    content = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(content, compresslevel=1, mtime=1))
    assert gzip.decompress(path.read_bytes()) == content


def change_manifest(src: Path, out: Path, **changes) -> None:
    manifest = json.loads((out / fetch.MANIFEST_FILE).read_text())
    manifest["files"][0].update(changes)
    (out / fetch.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("change", [
    regzip,  # the same content, gzipped otherwise: a full fetch records the new file's sha256
    lambda src, out: (src / "train-labels-idx1-ubyte.gz").unlink(),
    change_pixel,
    lambda src, out: (out / fetch.TEST_FILE).unlink(),
    lambda src, out: (out / fetch.UNLABELED_FILE).write_bytes(b""),
    lambda src, out: (out / fetch.TRAIN_FILE).write_bytes((out / fetch.TRAIN_FILE).read_bytes()[:-7]),
    lambda src, out: (out / fetch.TRAIN_FILE).write_bytes((out / fetch.TRAIN_FILE).read_bytes() + b"\0"),
    lambda src, out: (out / fetch.MANIFEST_FILE).write_text("{"),
    lambda src, out: change_manifest(src, out, url="https://example.com/train-images-idx3-ubyte.gz"),  # downloaded
    lambda src, out: change_manifest(src, out, content_sha256="0" * 64),
], ids=["regzipped source", "missing source", "changed pixel", "missing test.npz", "extra file", "truncated npz", "npz with trailing bytes",
        "bad manifest", "manifest of a download", "manifest of other content"])
def test_an_output_that_fetch_would_not_write_so_is_not_up_to_date(tmp_path, monkeypatch, change):
    write_small_fashion_files(tmp_path / "src")
    trust_fashion_files(monkeypatch, tmp_path / "src")
    cfg, out = fashion_config(tmp_path / "src"), tmp_path / "raw"
    fetch.save_raw(fetch_dataset(cfg), out)
    change(tmp_path / "src", out)
    assert fetch.up_to_date(cfg, out) is None
    assert fetch.up_to_date(DataConfig(source="mnist", dir=str(tmp_path / "src"), download=False), out) is None
