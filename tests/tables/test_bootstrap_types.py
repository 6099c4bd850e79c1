"""Bootstrap from a file (``SKQK_BOOTSTRAP_DATA``) types its columns like ``skqk init --data``,
with ``SKQK_BOOTSTRAP_CATEGORICAL / NUMERIC / DROP`` as the overrides; the table carries the
raw rows it will store."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from app.intake.bootstrap import settings_table
from app.settings import Settings


def test_bootstrap_table_types(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"code": [1, 2, 3, 1] * 10, "city": ["a", None, "b", "a"] * 10,
                             "size": [1.5, None, 2.0, 3.0] * 10, "junk": ["x"] * 40,
                             "label": ["p", "q"] * 20}), path)
    settings = Settings(bootstrap_data=path, bootstrap_label_column="label", bootstrap_categorical="code",
                        bootstrap_drop="junk")
    table = settings_table(settings)
    enc = table.schema.encoding
    assert enc is not None
    assert [(c.name, c.kind) for c in enc.columns] == [("code", "categorical"), ("city", "categorical"),
                                                        ("size", "numeric")]
    assert table.x.shape == (40, enc.width) and table.schema.input_dim == enc.width
    assert table.raw is not None and json.loads(table.raw[1]) == ["2", None, None]
    assert table.schema.class_names == ("p", "q")
