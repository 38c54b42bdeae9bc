"""Fetch stage: read one data source into uint8 image arrays plus a manifest of what was read.

Sources (`data.source`):

- ``fashion_mnist``: the four official IDX .gz files, from `data.dir` or downloaded. Every file is
  checked against the sha256 of its *decompressed* content, because Debian and the mirrors re-gzip
  the files (the .gz bytes differ between them, the IDX bytes do not).
- ``mnist``: the same layout; each .gz file is checked against the md5 torchvision publishes for it
  (see `IdxSource` for why a different kind of hash).
- ``cifar10``: the official python-version tarball, sha256-checked before anything in it is read;
  its pickled batches are read straight from the archive (nothing is extracted to disk), with an
  unpickler that only rebuilds numpy arrays.
- ``csv``: a Kaggle-style labeled CSV (id, label, one column per pixel, row-major HWC) and an
  optional unlabeled CSV (id, pixels) whose images the predict stage labels.
- ``image_folder``: one sub-folder of PNG/JPEG files per class, and an optional folder of unlabeled
  images to predict; every image is converted to `data.image_shape` with Pillow.
- ``digits``: scikit-learn's bundled 8x8 digits, with a fixed stratified test split.

`fetch_dataset` only reads its inputs; `save_raw` / `load_raw` write and read the stage's output
directory; `dataset_digest` names the data (the MLflow dataset digest).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas (1.5 s to import) only for CSV sources: the fetch stage reruns on every `dvc repro`
    import pandas as pd

from pipeline.config import DataConfig
from pipeline.errors import PipelineError, count
from pipeline.files import atomic_path, load_arrays, read_json, save_arrays, sha256_file, write_json, write_npz

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
    """A dataset in the MNIST layout: an images and a labels IDX .gz file per split (IDX_SPLITS).

    Each file stem has exactly one known hash, in `content_sha256` or in `gz_md5`, because what we
    can vouch for differs between datasets:

    - content_sha256, the sha256 of the decompressed IDX bytes: Debian and the mirrors re-gzip
      Fashion-MNIST (their .gz bytes differ, the IDX bytes do not), so only a content hash fits
      every copy.
    - gz_md5, the md5 of the .gz file itself: for MNIST the only hashes we can vouch for offline are
      the MD5s torchvision publishes for the original .gz files, which the mirrors serve byte for
      byte. It is checked before decompressing, so an unverified file is never gunzipped. MD5 catches
      corrupt and wrong files, not a deliberately forged one; IDX parsing runs no code, so that is
      enough here. A re-compressed copy of MNIST fails the check although its content is right.

    The manifest records which check passed (`verified_by`) and the content sha256 in both cases.
    """

    folder: str  # subfolder of data.download_dir that downloads go to
    urls: tuple[str, ...]  # base URLs tried in order; the file name is appended
    class_names: tuple[str, ...]
    install_hint: str  # how to get the files without a download
    content_sha256: dict[str, str] = field(default_factory=dict)  # file stem -> sha256 of the decompressed IDX bytes
    gz_md5: dict[str, str] = field(default_factory=dict)  # file stem -> md5 of the .gz file


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
    "mnist": IdxSource(
        folder="mnist",
        urls=(
            "https://storage.googleapis.com/cvdf-datasets/mnist/",  # CVDF's mirror of the original files
            "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision.datasets.MNIST's mirror
        ),
        # torchvision.datasets.MNIST.resources: MD5s of the original .gz files
        gz_md5={
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        class_names=tuple(str(digit) for digit in range(10)),
        install_hint="fetch them from https://ossci-datasets.s3.amazonaws.com/mnist/ on a machine with network access",
    ),
}


@dataclass(frozen=True)
class ArchiveSource:
    """A dataset shipped as one .tar.gz of pickled batches, as CIFAR's python version is.

    Each batch is a dict with b"data", a uint8 (N, 3072) array whose rows are 32x32 images as 1024
    red, 1024 green then 1024 blue values (row-major CHW), and a list of N class indices under
    `label_key`; the meta member lists the class names under `names_key`.
    """

    file_name: str
    folder: str  # subfolder of data.download_dir that downloads go to
    urls: tuple[str, ...]  # base URLs tried in order; the file name is appended
    sha256: str  # of the .tar.gz file; checked before the archive is opened
    train_members: tuple[str, ...]  # in order
    test_members: tuple[str, ...]
    meta_member: str
    label_key: bytes
    names_key: bytes
    install_hint: str


CIFAR_SIDE = 32
CIFAR_CHANNELS = 3

ARCHIVE_SOURCES = {
    "cifar10": ArchiveSource(
        file_name="cifar-10-python.tar.gz",
        folder="cifar10",
        urls=("https://www.cs.toronto.edu/~kriz/",),  # the dataset's home page, as keras.datasets.cifar10
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",  # keras.datasets.cifar10's
        train_members=tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
        test_members=("cifar-10-batches-py/test_batch",),
        meta_member="cifar-10-batches-py/batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        install_hint="fetch it from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on a machine with "
                     "network access",
    ),
}


def fetch_dataset(cfg: DataConfig) -> RawDataset:
    """Read and check the source `cfg.source`; raise PipelineError on any bad or missing input."""
    if cfg.source in IDX_SOURCES:
        return _fetch_idx(cfg.source, cfg)
    if cfg.source in ARCHIVE_SOURCES:
        return _fetch_archive(cfg.source, cfg)
    if cfg.source == "csv":
        return _fetch_csv(cfg)
    if cfg.source == "image_folder":
        return _fetch_image_folder(cfg)
    if cfg.source == "digits":
        return _fetch_digits()
    known = [*IDX_SOURCES, *ARCHIVE_SOURCES, "csv", "image_folder", "digits"]
    raise PipelineError(f"data.source = {cfg.source!r}: expected one of {known}")


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
            f"(uint8, {count(ndim, 'dimension')})"
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
    if (stem in spec.content_sha256) == (stem in spec.gz_md5):
        raise ValueError(f"IdxSource for {spec.folder}: {stem} needs exactly one known hash")
    name = f"{stem}.gz"
    path, url = _locate(spec, name, cfg)
    raw = path.read_bytes()
    record = _gz_record(spec, stem, path, raw, url)
    content = _gunzip(raw, path)
    content_sha256 = hashlib.sha256(content).hexdigest()
    if stem in spec.content_sha256:
        expected = spec.content_sha256[stem]
        if content_sha256 != expected:
            raise PipelineError(
                f"{path}: sha256 of the decompressed {stem} is {content_sha256}, expected {expected}; "
                "the file is corrupt or not the official one: delete or replace it"
            )
        logger.info("verified %s (content sha256 %s)", path, content_sha256)
        record["verified_by"] = "content_sha256"
    record["content_sha256"] = content_sha256
    return parse_idx(content, name, magic), record


def _gz_record(spec: IdxSource, stem: str, path: Path, raw: bytes, url: str | None = None) -> dict:
    """The manifest's record of `stem`'s .gz file `raw`, less its content hash; a file known by its md5
    is checked here (PipelineError), before anything decompresses it."""
    record = {"name": f"{stem}.gz", "path": str(path), **({"url": url} if url else {}),
              "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    if stem in spec.gz_md5:
        actual = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        expected = spec.gz_md5[stem]
        if actual != expected:
            raise PipelineError(
                f"{path}: md5 of the .gz file is {actual}, expected {expected}; the file is corrupt, "
                "re-compressed or not the official one: delete or replace it"
            )
        logger.info("verified %s (md5 %s)", path, actual)
        record.update(verified_by="gz_md5", md5=actual)
    return record


def _locate(spec: IdxSource | ArchiveSource, name: str, cfg: DataConfig) -> tuple[Path, str | None]:
    """Path of `name`, from data.dir or else downloaded; the URL too when downloaded now."""
    path = _on_disk(spec, name, cfg)
    if path is not None:
        if path != Path(cfg.dir).expanduser() / name:
            logger.info("using %s, downloaded earlier", path)
        return path, None
    if not cfg.download:
        raise PipelineError(
            f"{name} not found in {Path(cfg.dir).expanduser()} and data.download is false; {spec.install_hint}, "
            "set data.dir to a folder holding the files, or set data.download=true"
        )
    return _download(spec, name, cfg)


def _on_disk(spec: IdxSource | ArchiveSource, name: str, cfg: DataConfig) -> Path | None:
    """`name` in data.dir, else the copy an earlier download left in data.download_dir; None if neither."""
    local = Path(cfg.dir).expanduser() / name
    if local.is_file():
        return local
    cached = Path(os.path.expanduser(cfg.download_dir)) / spec.folder / name
    return cached if cfg.download and cached.is_file() else None


def _download(spec: IdxSource | ArchiveSource, name: str, cfg: DataConfig) -> tuple[Path, str | None]:
    cache_dir = Path(os.path.expanduser(cfg.download_dir))
    cached = cache_dir / spec.folder / name
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


def up_to_date(cfg: DataConfig, out_dir: str | os.PathLike) -> dict | None:
    """The manifest in `out_dir` when, for an IDX source, `out_dir` already holds what fetch_dataset and
    save_raw would write there; else None, and the stage reads and writes as usual.

    `dvc repro` runs fetch every time, because its source files live outside the repo. Decompressing
    Fashion-MNIST to verify it takes 0.3 s, and a rewritten data/raw is hashed by DVC again. Checked
    here without decompressing: each .gz file on disk is the one the manifest records, byte for byte
    (its sha256; for MNIST its md5 too); the arrays in `out_dir`, with their IDX headers, hash to the
    content sha256 (for Fashion-MNIST, the known one); and each .npz file holds exactly the bytes that
    save_raw writes for its arrays. Anything else, or any unreadable file: None.
    """
    spec = IDX_SOURCES.get(cfg.source)
    out_dir = Path(out_dir)
    try:
        if spec is None or sorted(p.name for p in out_dir.iterdir()) != sorted([MANIFEST_FILE, TRAIN_FILE, TEST_FILE]):
            return None
        manifest = read_json(out_dir / MANIFEST_FILE)
        recorded = {record.get("role"): record for record in manifest["files"]}
        files, counts, shapes = [], {}, {}
        for split, (images_stem, labels_stem) in IDX_SPLITS.items():
            data = (out_dir / (TRAIN_FILE if split == "train" else TEST_FILE)).read_bytes()
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                if sorted(npz.files) != ["x", "y"]:
                    return None
                images, labels = npz["x"], npz["y"]
            if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 1 or labels.dtype != np.int64
                    or labels.shape != images.shape[:1] or not np.array_equal(labels, labels.astype(np.uint8))):
                return None
            written = io.BytesIO()
            write_npz(written, x=images, y=labels)
            if written.getvalue() != data:
                return None
            for role, stem, array, magic in ((f"{split}_images", images_stem, images[..., 0], IDX_IMAGES_MAGIC),
                                             (f"{split}_labels", labels_stem, labels.astype(np.uint8), IDX_LABELS_MAGIC)):
                record = _unchanged_file(spec, stem, cfg, recorded.get(role, {}))
                if record is None or _idx_sha256(array, magic) != record["content_sha256"]:
                    return None
                files.append({"role": role, **record})
            _check_label_range(labels, labels_stem, len(spec.class_names))
            counts[split], shapes[split] = len(images), [int(d) for d in images.shape[1:]]
    except Exception:  # unreadable, or not what fetch writes: the full fetch that follows says what is wrong
        return None
    expected = {"source": cfg.source, "files": files, "counts": {**counts, "unlabeled": 0},
                "class_names": list(spec.class_names), "image_shape": shapes["train"]}
    if manifest != expected:
        return None
    for record in files:
        logger.info("verified %s (unchanged since %s was made from it: sha256 %s)", record["path"], out_dir,
                    record["sha256"])
    return manifest


def _unchanged_file(spec: IdxSource, stem: str, cfg: DataConfig, recorded: dict) -> dict | None:
    """The record fetch would write for `stem`'s .gz file, found where fetch would look, without
    decompressing it: None when it is missing or is not the file `recorded` names (PipelineError when
    it fails its md5)."""
    path = _on_disk(spec, f"{stem}.gz", cfg)
    if path is None:
        return None
    record = _gz_record(spec, stem, path, path.read_bytes())
    if record["sha256"] != recorded.get("sha256"):
        return None
    if stem in spec.gz_md5:  # the content of this very .gz, hashed when it was decompressed and written
        return {**record, "content_sha256": recorded.get("content_sha256")}
    return {**record, "verified_by": "content_sha256", "content_sha256": spec.content_sha256[stem]}


def _idx_sha256(array: np.ndarray, magic: int) -> str:
    """sha256 of `array` as an IDX file holds it: the big-endian magic and dimensions, then the bytes."""
    digest = hashlib.sha256(np.array([magic, *array.shape], dtype=">u4").tobytes())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _gunzip(raw: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise PipelineError(f"{path}: not a complete gzip file ({exc}); delete or replace it") from None


def _check_label_range(labels: np.ndarray, name: str, num_classes: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise PipelineError(
            f"{name}: label {int(labels[bad[0]])} at index {int(bad[0])}; expected 0..{num_classes - 1}"
        )


# ---------------------------------------------------------------------------------------------
# pickled-batch archive (CIFAR python version)

# The globals a pickled numpy array needs, numpy 1 and 2 spellings; the same list as Keras' own
# CIFAR loader (keras.src.datasets.npz_utils). Anything else (os.system, builtins.eval) is refused.
PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
})


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only."""

    def find_class(self, module, name):
        if (module, name) in PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load the global {module}.{name}; only numpy arrays are allowed")


def _fetch_archive(source: str, cfg: DataConfig) -> RawDataset:
    spec = ARCHIVE_SOURCES[source]
    path, url = _locate(spec, spec.file_name, cfg)
    # Checked before the archive is opened: only the official file's pickles are ever unpickled.
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise PipelineError(
            f"{path}: sha256 is {actual}, expected {spec.sha256}; the file is corrupt or not the official "
            f"{spec.file_name}: delete or replace it"
        )
    logger.info("verified %s (sha256 %s)", path, actual)
    members = read_tar_members(path, [*spec.train_members, *spec.test_members, spec.meta_member])
    meta = _unpickle(members[spec.meta_member], path, spec.meta_member)
    class_names = _class_names(meta, spec, path)
    splits = {}
    for split, names in (("train", spec.train_members), ("test", spec.test_members)):
        batches = [_batch(_unpickle(members[name], path, name), spec, path, name) for name in names]
        for (_, labels), name in zip(batches, names):
            _check_label_range(labels, f"{path}: {name}", len(class_names))
        splits[split] = (np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]))
    record = {"role": "archive", "name": spec.file_name, "path": str(path), **({"url": url} if url else {}),
              "sha256": actual, "bytes": path.stat().st_size, "members": list(members)}
    return _dataset(source, [record], class_names, splits["train"], test=splits["test"])


def read_tar_members(path: str | os.PathLike, names: list[str]) -> dict[str, bytes]:
    """The bytes of the members `names` of a .tar.gz, read in one pass without extracting anything.

    Every member is checked, read or not: an absolute path, a `..` component, a link or a device
    rejects the whole archive, since such an archive is not the one we expect.
    """
    path, wanted, found = Path(path), set(names), {}
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            for member in archive:
                problem = _unsafe_member(member)
                if problem:
                    raise PipelineError(
                        f"{path}: member {member.name!r} {problem}; refusing the archive, whose members "
                        "must be plain files and folders inside it"
                    )
                if member.name in wanted:
                    if member.name in found:
                        raise PipelineError(f"{path}: member {member.name!r} appears twice; expected it once")
                    if not member.isfile():
                        raise PipelineError(f"{path}: member {member.name!r} is not a regular file")
                    found[member.name] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise PipelineError(f"{path}: not a readable .tar.gz archive ({exc}); delete or replace it") from None
    missing = [name for name in names if name not in found]
    if missing:
        raise PipelineError(f"{path}: no member {missing[0]!r}; expected the members {names}")
    return {name: found[name] for name in names}


def _unsafe_member(member: tarfile.TarInfo) -> str | None:
    name = PurePosixPath(member.name)  # tar member names use "/" whatever the platform
    if name.is_absolute():
        return "has an absolute path"
    if ".." in name.parts:
        return "has a '..' component"
    if member.issym() or member.islnk():
        return f"is a link to {member.linkname!r}"
    if not (member.isfile() or member.isdir()):
        return "is a device, FIFO or other special file"
    return None


def _unpickle(data: bytes, path: Path, name: str):
    # encoding="bytes", as the official loader: the batches are Python 2 pickles of byte strings
    try:
        return ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise PipelineError(f"{path}: member {name!r} is not a readable pickle ({exc})") from None


def _batch(batch, spec: ArchiveSource, path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and (N,) int64 labels of one unpickled batch."""
    where = f"{path}: {name}"
    if not isinstance(batch, dict) or b"data" not in batch or spec.label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise PipelineError(f"{where}: expected a dict with keys b'data' and {spec.label_key!r}, found {keys}")
    data, labels = batch[b"data"], np.asarray(batch[spec.label_key])
    pixels = CIFAR_SIDE * CIFAR_SIDE * CIFAR_CHANNELS
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == pixels):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise PipelineError(f"{where}: b'data' is {found}; expected a uint8 array of shape (N, {pixels})")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise PipelineError(
            f"{where}: {spec.label_key!r} holds {labels.shape} {labels.dtype} values for {len(data)} images; "
            "expected one integer label per image"
        )
    # each row is CHW (1024 red, 1024 green, 1024 blue values, each row-major) -> HWC
    images = data.reshape(-1, CIFAR_CHANNELS, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _class_names(meta, spec: ArchiveSource, path: Path) -> list[str]:
    names = meta.get(spec.names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise PipelineError(f"{path}: {spec.meta_member}: expected a non-empty list of class names under "
                            f"{spec.names_key!r}")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


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
    import pandas as pd

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
    import pandas as pd

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
    import pandas as pd

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
    import pandas as pd

    return bool(pd.Series(text).str.fullmatch(INTEGER_PATTERN).all())


def _encode_labels(column: pd.Series, path: Path) -> tuple[list[str], np.ndarray]:
    """Class names (sorted, numerically when all labels are integers) and each row's class index."""
    text = _text_cells(column, path, "label")
    values = text.astype(np.int64) if _is_integer_text(text) else text
    classes, y = np.unique(values, return_inverse=True)
    return [str(c) for c in classes], y.astype(np.int64)


def _ids(column: pd.Series, path: Path) -> np.ndarray:
    """Ids as int64 when all are integers, else str; empty or repeated ids are errors."""
    import pandas as pd

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
# image folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # matched case-insensitively
IMAGE_FORMATS = ("PNG", "JPEG")  # the only decoders Pillow may use, whatever the file name says
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale PNGs open in these


def _fetch_image_folder(cfg: DataConfig) -> RawDataset:
    spec = cfg.image_folder
    if spec.train is None:
        raise PipelineError(
            "data.image_folder.train is not set; expected a folder with one sub-folder of PNG or JPEG images "
            "per class when data.source is image_folder"
        )
    shape = tuple(int(d) for d in cfg.image_shape)
    train_dir = _folder(spec.train, "data.image_folder.train")
    class_dirs = _class_folders(train_dir)
    paths, labels = [], []
    for index, class_dir in enumerate(class_dirs):
        images = _image_files(class_dir)
        if not images:
            raise PipelineError(
                f"{class_dir}: no {', '.join(IMAGE_SUFFIXES)} files; expected at least one image in each class "
                "folder (remove the folder to drop the class)"
            )
        paths += images
        labels += [index] * len(images)
    train_x, record = _read_images(train_dir, paths, shape, spec.resize)
    files = [{"role": "train", **record}]
    unlabeled = None
    if spec.unlabeled is not None:
        unlabeled_dir = _folder(spec.unlabeled, "data.image_folder.unlabeled")
        images = _image_files(unlabeled_dir)
        if not images:
            raise PipelineError(
                f"{unlabeled_dir}: no {', '.join(IMAGE_SUFFIXES)} files (data.image_folder.unlabeled); "
                "expected the images to predict"
            )
        unlabeled_x, record = _read_images(unlabeled_dir, images, shape, spec.resize)
        unlabeled = (unlabeled_x, np.array([p.name for p in images]))
        files.append({"role": "unlabeled", **record})
    class_names = [d.name for d in class_dirs]
    return _dataset("image_folder", files, class_names, (train_x, np.array(labels, dtype=np.int64)),
                    unlabeled=unlabeled)


def _folder(name: str, key: str) -> Path:
    folder = Path(name).expanduser()
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "folder not found"
        raise PipelineError(f"{folder}: {what} ({key}); expected a folder of images")
    return folder


def _visible(folder: Path) -> list[Path]:
    """The folder's entries in sorted name order; hidden ones (.DS_Store, .ipynb_checkpoints) are skipped."""
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _class_folders(train_dir: Path) -> list[Path]:
    entries = _visible(train_dir)
    stray = [p for p in entries if not p.is_dir()]
    if stray:
        raise PipelineError(
            f"{stray[0]}: not in a class sub-folder; expected data.image_folder.train ({train_dir}) to hold "
            "only one sub-folder of images per class"
        )
    if len(entries) < 2:
        found = f"only {entries[0].name!r}" if entries else "none"
        raise PipelineError(
            f"{train_dir}: class sub-folders: {found} (data.image_folder.train); expected one sub-folder of "
            "images per class, at least two classes"
        )
    return entries


def _image_files(folder: Path) -> list[Path]:
    entries = _visible(folder)
    for entry in entries:
        if not (entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES):
            raise PipelineError(
                f"{entry}: expected only {', '.join(IMAGE_SUFFIXES)} files in {folder} "
                "(hidden files are skipped, sub-folders are not read)"
            )
    return entries


def _read_images(root: Path, paths: list[Path], shape: tuple[int, int, int], resize: bool) -> tuple[np.ndarray, dict]:
    """(N, H, W, C) uint8 images and a record whose content_sha256 covers every file's path and bytes."""
    from PIL import Image  # imported here: only this source needs Pillow

    images = np.empty((len(paths), *shape), dtype=np.uint8)
    tree = hashlib.sha256()  # over "relative path NUL sha256 LF" lines: a renamed class changes the data
    total = resized = 0
    for i, path in enumerate(paths):
        data = path.read_bytes()
        tree.update(f"{path.relative_to(root).as_posix()}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        total += len(data)
        images[i], was_resized = _decode_image(Image, data, path, shape, resize)
        resized += was_resized
    logger.info("read %d images from %s (%d resized)", len(paths), root, resized)
    record = {"name": root.name, "path": str(root), "images": len(paths), "bytes": total,
              "content_sha256": tree.hexdigest(), "resized": resized}
    return images, record


def _decode_image(Image, data: bytes, path: Path, shape: tuple[int, int, int], resize: bool) -> tuple[np.ndarray, bool]:
    """One image as (H, W, C) uint8: mode L (1 channel) or RGB (3; alpha dropped), resized if allowed."""
    height, width, channels = shape
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
            opened.load()
            image = opened
            if image.mode in SIXTEEN_BIT_MODES:  # Pillow's convert("L") would clip 16-bit values at 255
                wide = np.asarray(image, dtype=np.int64)
                image = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), mode="L")
            mode = "L" if channels == 1 else "RGB"
            if image.mode != mode:
                image = image.convert(mode)
            size = image.size  # (width, height)
            if size != (width, height) and resize:
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # UnidentifiedImageError (not PNG or JPEG) and "image file is truncated" are OSErrors
        raise PipelineError(f"{path}: not a readable PNG or JPEG image ({exc}); fix or remove the file") from None
    if size != (width, height) and not resize:
        raise PipelineError(
            f"{path}: {size[1]}x{size[0]} pixels (height x width), expected {height}x{width} for "
            f"data.image_shape {list(shape)}; set data.image_folder.resize=true to resize"
        )
    return pixels.reshape(shape), size != (width, height)


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
