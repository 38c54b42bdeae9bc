"""Write IDX files (the MNIST format) for tests: a big-endian header, then the uint8 payload."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000080<ndim>, one uint32 per dimension, the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = np.array([0x0800 | array.ndim, *array.shape], dtype=">u4")
    return header.tobytes() + array.tobytes()


def write_gz(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data))
    return path


def write_idx_gz(path: str | Path, array: np.ndarray) -> Path:
    return write_gz(path, idx_bytes(array))
