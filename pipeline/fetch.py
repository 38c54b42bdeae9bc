"""Fetch stage: read one data source into uint8 image arrays plus a manifest of what was read.

Sources (`data.source`):

- ``fashion_mnist``: the four official IDX .gz files, from `data.dir` or downloaded. Every file is
  checked against the sha256 of its *decompressed* content, because Debian and the mirrors re-gzip
  the files (the .gz bytes differ between them, the IDX bytes do not).
- ``csv``: a Kaggle-style labeled CSV (id, label, one column per pixel, row-major HWC) and an
  optional unlabeled CSV (id, pixels) whose images the predict stage labels.
- ``digits``: scikit-learn's bundled 8x8 digits, with a fixed stratified test split.

`fetch_dataset` only reads its inputs; `save_raw` / `load_raw` write and read the stage's output
directory; `dataset_digest` names the data (the MLflow dataset digest).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from pipeline.files import atomic_path, load_arrays, read_json, save_arrays, sha256_file, write_json

logger = logging.getLogger(__name__)

PIXEL_MAX = 255
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions: count, rows, columns
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension: count
DIGITS_TEST_SIZE = 0.2
DIGITS_RANDOM_STATE = 0
DIGITS_LEVELS = 16  # load_digits' pixels count 0..16 set bits of a 4x4 block

TRAIN_FILE = "train.npz"
TEST_FILE = "test.npz"
UNLABELED_FILE = "unlabeled.npz"
MANIFEST_FILE = "manifest.json"


@dataclass(eq=False)
class RawDataset:
    """Images as fetched: uint8 (N, H, W, C), labels as int64 indices into `class_names`."""

    class_names: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None = None  # labeled test split; None when the source has none
    test_y: np.ndarray | None = None
    unlabeled_x: np.ndarray | None = None  # images to predict, in input order
    unlabeled_ids: np.ndarray | None = None  # int64 if every id is an integer, else str
    manifest: dict = field(default_factory=dict)


@dataclass(frozen=True)
class IdxSource:
    """A dataset in the MNIST layout: an images and a labels IDX .gz file per split (IDX_SPLITS)."""

    folder: str  # subfolder of data.download_dir that downloads go to
    urls: tuple[str, ...]  # base URLs tried in order; the file name is appended
    content_sha256: dict[str, str]  # decompressed file name -> sha256 of its IDX bytes
    class_names: tuple[str, ...]
    install_hint: str  # how to get the files without a download


# (images, labels) file stems per split, shared by MNIST and Fashion-MNIST
IDX_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

IDX_SOURCES = {
    "fashion_mnist": IdxSource(
        folder="fashion-mnist",
        urls=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # zalandoresearch/fashion-mnist README
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",  # keras.datasets.fashion_mnist's copy
        ),
        # computed from Debian's dataset-fashion-mnist files; identical to the upstream IDX content
        content_sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        install_hint="install them with `apt-get install dataset-fashion-mnist`",
    ),
}


def fetch_dataset(cfg: DataConfig) -> RawDataset:
    """Read and check the source `cfg.source`; raise PipelineError on any bad or missing input."""
    if cfg.source in IDX_SOURCES:
        return _fetch_idx(cfg.source, cfg)
    if cfg.source == "csv":
        return _fetch_csv(cfg)
    if cfg.source == "digits":
        return _fetch_digits()
    raise PipelineError(f"data.source = {cfg.source!r}: expected one of {[*IDX_SOURCES, 'csv', 'digits']}")


# ---------------------------------------------------------------------------------------------
# IDX (MNIST layout)


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read a gzipped uint8 IDX file; `magic` is IDX_IMAGES_MAGIC or IDX_LABELS_MAGIC."""
    path = Path(path)
    return parse_idx(_gunzip(path.read_bytes(), path), path.name, magic)


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 1) uint8 and labels (N,) int64 from a pair of gzipped IDX files."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    return pair_idx(images, labels, Path(images_path).name, Path(labels_path).name)


def parse_idx(data: bytes, name: str, magic: int) -> np.ndarray:
    """Decode uint8 IDX bytes: big-endian uint32 magic, one uint32 per dimension, then the payload."""
    ndim = magic & 0xFF
    header_bytes = 4 * (1 + ndim)
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        shown = "none (file shorter than 4 bytes)" if found is None else f"0x{found:08x}"
        raise PipelineError(
            f"{name}: IDX magic number {shown}, expected 0x{magic:08x} "
            f"(uint8, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    if len(data) < header_bytes:
        raise PipelineError(f"{name}: {len(data)} bytes, shorter than the {header_bytes}-byte header of this IDX file")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header_bytes + int(np.prod(dims))
    if len(data) != expected:
        raise PipelineError(
            f"{name}: {len(data)} bytes, expected {expected} for header dimensions {list(dims)}; "
            "the file is truncated or has trailing bytes"
        )
    # a copy, so the caller gets a writable array that does not pin the decompressed buffer
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(dims).copy()


def pair_idx(
    images: np.ndarray, labels: np.ndarray, images_name: str, labels_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Check that images and labels correspond; return (N, H, W, 1) uint8 and (N,) int64."""
    if len(images) != len(labels):
        raise PipelineError(
            f"{images_name} has {len(images)} images but {labels_name} has {len(labels)} labels; "
            "expected one label per image"
        )
    return images[..., np.newaxis], labels.astype(np.int64)


def _fetch_idx(source: str, cfg: DataConfig) -> RawDataset:
    spec = IDX_SOURCES[source]
    files, splits = [], {}
    for split, (images_stem, labels_stem) in IDX_SPLITS.items():
        images, images_record = _verified_idx(spec, images_stem, IDX_IMAGES_MAGIC, cfg)
        labels, labels_record = _verified_idx(spec, labels_stem, IDX_LABELS_MAGIC, cfg)
        splits[split] = pair_idx(images, labels, images_record["name"], labels_record["name"])
        _check_label_range(splits[split][1], labels_record["name"], len(spec.class_names))
        files += [{"role": f"{split}_images", **images_record}, {"role": f"{split}_labels", **labels_record}]
    return _dataset(source, files, list(spec.class_names), splits["train"], test=splits["test"])


def _verified_idx(spec: IdxSource, stem: str, magic: int, cfg: DataConfig) -> tuple[np.ndarray, dict]:
    name = f"{stem}.gz"
    path, url = _locate(spec, name, cfg)
    raw = path.read_bytes()
    content = _gunzip(raw, path)
    actual = hashlib.sha256(content).hexdigest()
    expected = spec.content_sha256[stem]
    if actual != expected:
        raise PipelineError(
            f"{path}: sha256 of the decompressed {stem} is {actual}, expected {expected}; "
            "the file is corrupt or not the official one: delete or replace it"
        )
    logger.info("verified %s (content sha256 %s)", path, actual)
    record = {"name": name, "path": str(path), **({"url": url} if url else {})}
    record.update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw), content_sha256=actual)
    return parse_idx(content, name, magic), record


def _locate(spec: IdxSource, name: str, cfg: DataConfig) -> tuple[Path, str | None]:
    """Path of `name`, from data.dir or else downloaded; the URL too when downloaded now."""
    local = Path(cfg.dir).expanduser() / name
    if local.is_file():
        return local, None
    if not cfg.download:
        raise PipelineError(
            f"{name} not found in {local.parent} and data.download is false; {spec.install_hint}, "
            "set data.dir to a folder holding the files, or set data.download=true"
        )
    return _download(spec, name, cfg)


def _download(spec: IdxSource, name: str, cfg: DataConfig) -> tuple[Path, str | None]:
    cache_dir = Path(os.path.expanduser(cfg.download_dir))
    cached = cache_dir / spec.folder / name
    if cached.is_file():
        logger.info("using %s, downloaded earlier", cached)
        return cached, None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(
            f"data.download_dir = {cfg.download_dir!r}: cannot create {cached.parent} ({exc})"
        ) from None
    if not os.access(cached.parent, os.W_OK):  # get_file would silently download to /tmp/.keras instead
        raise PipelineError(f"data.download_dir = {cfg.download_dir!r}: {cached.parent} is not writable")
    # imported here: keras loads TensorFlow, which takes seconds and only downloads need
    from keras.utils import get_file

    failures = []
    for base in spec.urls:
        url = base + name
        logger.info("downloading %s", url)
        try:
            path = get_file(fname=name, origin=url, cache_dir=str(cache_dir), cache_subdir=spec.folder)
        except Exception as exc:  # get_file re-raises URL errors as a bare Exception
            failures.append(f"{url}: {' '.join(str(exc).split())}")
            continue
        return Path(path), url
    raise PipelineError(
        f"{name} not found in {Path(cfg.dir).expanduser()} and could not be downloaded to "
        f"{cached.parent} ({'; '.join(failures)}); {spec.install_hint}, "
        "or set data.dir to a folder holding the files"
    )


def _gunzip(raw: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise PipelineError(f"{path}: not a complete gzip file ({exc}); delete or replace it") from None


def _check_label_range(labels: np.ndarray, name: str, num_classes: int) -> None:
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise PipelineError(
            f"{name}: label {int(labels[bad[0]])} at index {int(bad[0])}; expected 0..{num_classes - 1}"
        )


# ---------------------------------------------------------------------------------------------
# CSV (Kaggle style)

HEADER_LINES = 1  # so data row i (0-based) is on line i + 1 + HEADER_LINES of the file
INTEGER_PATTERN = r"[+-]?\d{1,18}"  # fits int64


def _fetch_csv(cfg: DataConfig) -> RawDataset:
    spec = cfg.csv
    if spec.train is None:
        raise PipelineError(
            "data.csv.train is not set; expected the path of a labeled CSV "
            "(id column, label column, one column per pixel) when data.source is csv"
        )
    shape = tuple(int(d) for d in cfg.image_shape)
    train_path = Path(spec.train)
    train = _read_csv(train_path, {spec.id_column: "data.csv.id_column", spec.label_column: "data.csv.label_column"})
    pixel_columns = [c for c in train.columns if c not in (spec.id_column, spec.label_column)]
    _check_pixel_count(train_path, pixel_columns, shape, [spec.id_column, spec.label_column])
    train_x = _pixels(train, pixel_columns, train_path, shape)
    class_names, train_y = _encode_labels(train[spec.label_column], train_path)
    _ids(train[spec.id_column], train_path)
    files = [{"role": "train", **_file_record(train_path)}]
    unlabeled = None
    if spec.test is not None:
        test_path = Path(spec.test)
        test = _read_csv(test_path, {spec.id_column: "data.csv.id_column"})
        test_columns = [c for c in test.columns if c != spec.id_column]
        _check_same_pixels(test_path, test_columns, train_path, pixel_columns, spec.id_column)
        unlabeled = (_pixels(test, pixel_columns, test_path, shape), _ids(test[spec.id_column], test_path))
        files.append({"role": "unlabeled", **_file_record(test_path)})
    return _dataset("csv", files, class_names, (train_x, train_y), unlabeled=unlabeled)


def _read_csv(path: Path, required: dict[str, str]) -> pd.DataFrame:
    """Read a CSV whose `required` columns (name -> config key) are kept as text, pixels as numbers."""
    header = _read_header(path)
    for column, key in required.items():
        if column not in header:
            shown = ", ".join(repr(c) for c in header[:5]) + (", ..." if len(header) > 5 else "")
            raise PipelineError(f"{path}: no column {column!r} ({key}) in the header; found {shown}")
    frame = _parse_csv(path, text_columns=list(required))
    if frame.empty:
        raise PipelineError(f"{path}: no data rows; expected at least one row after the header")
    logger.info("read %d rows x %d columns from %s", *frame.shape, path)
    return frame


def _read_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found; expected a CSV with a header line") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"{path}: cannot read the header line ({exc}); expected a UTF-8 CSV") from None
    if not header:
        raise PipelineError(f"{path}: empty file; expected a header line of column names")
    seen = set()
    for position, column in enumerate(header, start=1):
        if column in seen:
            raise PipelineError(
                f"{path}: column {position} {column!r} appears twice in the header; expected unique names"
            )
        seen.add(column)
    return header


def _parse_csv(path: Path, text_columns: list[str], usecols: list[str] | None = None) -> pd.DataFrame:
    # blank lines become rows of empty cells, so row i stays on line i + 1 + HEADER_LINES
    options = dict(dtype={c: str for c in text_columns}, usecols=usecols, keep_default_na=False,
                   na_values=[""], skip_blank_lines=False)
    if importlib.util.find_spec("pyarrow") is not None:
        try:
            return pd.read_csv(path, engine="pyarrow", **options)
        except ValueError:  # pyarrow's parse errors name no line; the C parser's below do
            pass
    try:
        return pd.read_csv(path, **options)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a well-formed CSV ({' '.join(str(exc).split())})") from None


def _check_pixel_count(path: Path, pixel_columns: list[str], shape: tuple[int, ...], other: list[str]) -> None:
    expected = int(np.prod(shape))
    if len(pixel_columns) != expected:
        raise PipelineError(
            f"{path}: {len(pixel_columns)} pixel columns besides {', '.join(map(repr, other))}; expected "
            f"{expected} = {'*'.join(map(str, shape))} for data.image_shape {list(shape)}"
        )


def _check_same_pixels(
    path: Path, columns: list[str], train_path: Path, train_columns: list[str], id_column: str
) -> None:
    if columns == train_columns:
        return
    extra = [c for c in columns if c not in set(train_columns)]
    missing = [c for c in train_columns if c not in set(columns)]
    if extra:
        detail = f"column {extra[0]!r} is not a pixel column of {train_path.name}"
    elif missing:
        detail = f"pixel column {missing[0]!r} of {train_path.name} is missing"
    else:
        i = next(i for i, (a, b) in enumerate(zip(columns, train_columns)) if a != b)
        detail = f"pixel column {i + 1} is {columns[i]!r} where {train_path.name} has {train_columns[i]!r}"
    raise PipelineError(
        f"{path}: pixel columns differ from the training CSV's: {detail}; expected {id_column!r} "
        f"then the same {len(train_columns)} pixel columns as {train_path}, in the same order"
    )


def _pixels(frame: pd.DataFrame, columns: list[str], path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """(N, H, W, C) uint8 from the pixel columns; any cell not an integer 0..255 is an error."""
    block = frame[columns]
    odd = [c for c in columns if not pd.api.types.is_integer_dtype(block[c].dtype)]
    text = None
    if odd:
        # re-read as text: type inference may have turned them into bools or dates, hiding the cell
        text = _parse_csv(path, text_columns=odd, usecols=odd)
        numbers = {c: pd.to_numeric(text[c].str.strip(), errors="coerce") for c in odd}
        block = block.assign(**numbers)
    values = block.to_numpy(dtype=np.float64 if odd else np.int64)
    valid = (values >= 0) & (values <= PIXEL_MAX)  # NaN fails both
    if odd:
        valid &= np.floor(values) == values
    if not valid.all():
        row, col = divmod(int(np.argmin(valid)), len(columns))  # first bad cell in file order
        raw = (text if columns[col] in odd else frame)[columns[col]].iloc[row]
        raise PipelineError(f"{_where(path, row, columns[col])}: {_pixel_problem(raw, values[row, col])}; "
                            f"expected an integer pixel value 0..{PIXEL_MAX}")
    return values.astype(np.uint8).reshape((len(values), *shape))


def _pixel_problem(raw, value: float) -> str:
    if pd.isna(raw):
        return "empty cell"
    if np.isnan(value):
        return f"{str(raw)!r} is not a number"
    if value != np.floor(value):
        return f"{raw} is not an integer"
    return f"{raw} is out of range"


def _text_cells(column: pd.Series, path: Path, what: str) -> np.ndarray:
    """Stripped text of an id or label column; an empty cell is an error."""
    stripped = column.str.strip()
    empty = (stripped.isna() | (stripped == "")).to_numpy()
    if empty.any():
        row = int(np.argmax(empty))
        raise PipelineError(f"{_where(path, row, column.name)}: empty {what}; expected a {what} on every row")
    return stripped.to_numpy(dtype=str)


def _is_integer_text(text: np.ndarray) -> bool:
    return bool(pd.Series(text).str.fullmatch(INTEGER_PATTERN).all())


def _encode_labels(column: pd.Series, path: Path) -> tuple[list[str], np.ndarray]:
    """Class names (sorted, numerically when all labels are integers) and each row's class index."""
    text = _text_cells(column, path, "label")
    values = text.astype(np.int64) if _is_integer_text(text) else text
    classes, y = np.unique(values, return_inverse=True)
    return [str(c) for c in classes], y.astype(np.int64)


def _ids(column: pd.Series, path: Path) -> np.ndarray:
    """Ids as int64 when all are integers, else str; empty or repeated ids are errors."""
    text = _text_cells(column, path, "id")
    ids = text.astype(np.int64) if _is_integer_text(text) else text
    repeated = pd.Series(ids).duplicated().to_numpy()
    if repeated.any():
        row = int(np.argmax(repeated))
        first = int(np.argmax(ids == ids[row]))
        raise PipelineError(
            f"{_where(path, row, column.name)}: duplicate id {str(text[row])!r} (first on line "
            f"{first + 1 + HEADER_LINES}); expected unique ids"
        )
    return ids


def _where(path: Path, row: int, column: str) -> str:
    return f"{path}, line {row + 1 + HEADER_LINES}, column {column!r}"


def _file_record(path: Path) -> dict:
    return {"name": path.name, "path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


def _fetch_digits() -> RawDataset:
    # imported here: scikit-learn takes seconds to import and only this source needs it
    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * PIXEL_MAX / DIGITS_LEVELS).astype(np.uint8)[..., np.newaxis]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=DIGITS_RANDOM_STATE
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)  # keep the bundle's order within each split
    content = hashlib.sha256(np.ascontiguousarray(bunch.images, dtype=np.float64).tobytes())
    content.update(labels.tobytes())
    data_file = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    record = {"role": "data", "package": f"scikit-learn {sklearn.__version__}", **_file_record(data_file),
              "content_sha256": content.hexdigest()}
    split = {"test_size": DIGITS_TEST_SIZE, "stratify": True, "random_state": DIGITS_RANDOM_STATE}
    return _dataset("digits", [record], [str(c) for c in range(10)], (images[train_idx], labels[train_idx]),
                    test=(images[test_idx], labels[test_idx]), split=split)


# ---------------------------------------------------------------------------------------------
# dataset, output directory, digest


def _dataset(source: str, files: list[dict], class_names: list[str], train: tuple, test: tuple | None = None,
             unlabeled: tuple | None = None, **extra) -> RawDataset:
    test_x, test_y = test if test is not None else (None, None)
    unlabeled_x, unlabeled_ids = unlabeled if unlabeled is not None else (None, None)
    manifest = {
        "source": source,
        "files": files,
        "counts": {"train": len(train[0]), "test": _count(test_x), "unlabeled": _count(unlabeled_x)},
        "class_names": list(class_names),
        "image_shape": [int(d) for d in train[0].shape[1:]],
        **extra,
    }
    return RawDataset(list(class_names), train[0], train[1], test_x, test_y, unlabeled_x, unlabeled_ids, manifest)


def _count(images: np.ndarray | None) -> int:
    return 0 if images is None else int(len(images))


def save_raw(ds: RawDataset, out_dir: str | os.PathLike) -> None:
    """Write train.npz, test.npz and unlabeled.npz (those present) and manifest.json, all or nothing."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_arrays(tmp / TRAIN_FILE, x=ds.train_x, y=ds.train_y)
        if ds.test_x is not None:
            save_arrays(tmp / TEST_FILE, x=ds.test_x, y=ds.test_y)
        if ds.unlabeled_x is not None:
            ids = np.asarray(ds.unlabeled_ids)
            save_arrays(tmp / UNLABELED_FILE, x=ds.unlabeled_x, ids=ids.astype(str) if ids.dtype == object else ids)
        write_json(tmp / MANIFEST_FILE, ds.manifest)


def load_raw(out_dir: str | os.PathLike) -> RawDataset:
    """Read what `save_raw` wrote."""
    out_dir = Path(out_dir)
    for name in (MANIFEST_FILE, TRAIN_FILE):
        if not (out_dir / name).is_file():
            raise PipelineError(f"{out_dir / name}: not found; expected the fetch stage's output in {out_dir}")
    manifest = read_json(out_dir / MANIFEST_FILE)
    train = load_arrays(out_dir / TRAIN_FILE)
    test = load_arrays(out_dir / TEST_FILE) if (out_dir / TEST_FILE).is_file() else {}
    unlabeled = load_arrays(out_dir / UNLABELED_FILE) if (out_dir / UNLABELED_FILE).is_file() else {}
    return RawDataset(
        class_names=list(manifest["class_names"]),
        train_x=train["x"],
        train_y=train["y"],
        test_x=test.get("x"),
        test_y=test.get("y"),
        unlabeled_x=unlabeled.get("x"),
        unlabeled_ids=unlabeled.get("ids"),
        manifest=manifest,
    )


def dataset_digest(data: RawDataset | dict) -> str:
    """16 hex digits of sha256 over the source, image shape and each file's role and content hash.

    Content hashes win over file hashes, so Fashion-MNIST from Debian or from a mirror (re-gzipped)
    has one digest; paths, URLs and file names are left out.
    """
    manifest = data.manifest if isinstance(data, RawDataset) else data
    identity = {
        "source": manifest["source"],
        "image_shape": [int(d) for d in manifest["image_shape"]],
        "files": sorted([f.get("role", ""), f.get("content_sha256") or f["sha256"]] for f in manifest["files"]),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
