"""Chunked, memory-bounded readers for users' data files (CSV, Parquet, NPZ); never imports torch."""

from app.intake.files.readers import (
    Chunk,
    DataFileError,
    detect_format,
    file_columns,
    iter_chunks,
    read_columns,
    read_table,
    total_rows,
)

__all__ = [
    "Chunk", "DataFileError", "detect_format", "file_columns", "iter_chunks", "read_columns", "read_table",
    "total_rows",
]
