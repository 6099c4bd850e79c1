"""Hostile data files, written by the tests that use them (never committed)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy.lib.format as npy


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def forged_npz(path: Path, x_shape: tuple[int, ...], y_shape: tuple[int, ...], x_data: bytes = b"",
               y_data: bytes = b"", deflate: bool = False) -> Path:
    """An NPZ whose headers declare ``x_shape``/``y_shape`` over whatever data is given."""
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as zf:
        zf.writestr("x.npy", npy_header(x_shape) + x_data)
        zf.writestr("y.npy", npy_header(y_shape, "<i8") + y_data)
    return path


def tiny_huge_npz(path: Path) -> Path:
    """~400 bytes whose x header declares one row of 2^40 features."""
    return forged_npz(path, (1, 1 << 40), (1,), y_data=b"\0" * 8)


def spinning_npz(path: Path) -> Path:
    """x declares (2, 2^62, 2^62): 2^124 values per row."""
    return forged_npz(path, (2, 1 << 62, 1 << 62), (2,), y_data=b"\0" * 16)


def many_rows_npz(path: Path, real_rows: int = 200_000, features: int = 4) -> Path:
    """Deflated zeros (``real_rows`` real rows) under headers that declare 10^12 rows."""
    return forged_npz(path, (10**12, features), (10**12,), x_data=b"\0" * (real_rows * features * 4),
                      y_data=b"\0" * (real_rows * 8), deflate=True)
