"""Format tests of each data source, the IDX reader, the stage's output directory and the digest."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from idx_format import idx_bytes, write_gz, write_idx_gz
from pipeline import fetch
from pipeline.config import CsvConfig, DataConfig
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
