"""Write CIFAR-10 python-version tarballs for tests: the official member names, real pickled batch dicts.

Each batch is what the official files hold: {b"batch_label", b"labels", b"data", b"filenames"} with
b"data" a uint8 (N, 3072) array of rows in CHW order (1024 red, 1024 green, 1024 blue values).
Pickle protocol 3 stores byte strings natively, as Python 2's pickles of the official files do, so
the batches need only numpy's array globals.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PROTOCOL = 3

GADGET_CALLS: list[str] = []  # what `Gadget` did when unpickled; must stay empty


def gadget(text: str) -> str:
    GADGET_CALLS.append(text)
    return text


class Gadget:
    """Unpickling this calls `gadget`: stands in for a pickle that runs code (os.system)."""

    def __reduce__(self):
        return gadget, ("ran",)


def cifar_images(n: int, seed: int) -> np.ndarray:
    """(n, 32, 32, 3) uint8 HWC images with distinct values per channel, so a CHW/HWC mix-up shows."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def to_rows(images: np.ndarray) -> np.ndarray:
    """HWC images -> the official (N, 3072) CHW rows."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)


def batch_bytes(images: np.ndarray, labels, name: str = "batch") -> bytes:
    batch = {
        b"batch_label": name.encode(),
        b"labels": [int(label) for label in labels],
        b"data": to_rows(images),
        b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))],
    }
    return pickle.dumps(batch, protocol=PROTOCOL)


def meta_bytes(class_names=CLASS_NAMES) -> bytes:
    meta = {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in class_names], b"num_vis": 3072}
    return pickle.dumps(meta, protocol=PROTOCOL)


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def special_member(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    """A link, device or FIFO member (`kind` is tarfile.SYMTYPE, LNKTYPE, CHRTYPE, ...)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def official_members(train: list[tuple[np.ndarray, list]], test: tuple[np.ndarray, list]) -> dict[str, bytes]:
    """Member name -> bytes of the five training batches (one per `train` entry), test_batch, batches.meta."""
    if len(train) != len(TRAIN_BATCHES):
        raise ValueError(f"expected {len(TRAIN_BATCHES)} training batches, got {len(train)}")
    members = {f"{FOLDER}/{name}": batch_bytes(x, y, name) for name, (x, y) in zip(TRAIN_BATCHES, train)}
    members[f"{FOLDER}/test_batch"] = batch_bytes(*test, "test_batch")
    members[f"{FOLDER}/batches.meta"] = meta_bytes()
    members[f"{FOLDER}/readme.html"] = b"<html>not read</html>"
    return members


def write_tarball(path: str | Path, members: dict[str, bytes], extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()):
    """A .tar.gz with the folder entry, `members` as regular files, then any `extra` members as given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        folder = tarfile.TarInfo(FOLDER)
        folder.type = tarfile.DIRTYPE
        folder.mode = 0o755
        archive.addfile(folder)
        for info, data in [*(file_member(n, d) for n, d in members.items()), *extra]:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path
