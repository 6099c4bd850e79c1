"""Raw table rows (text, booleans, nulls) for versions whose schema has column types.

A row is an object keyed by column name (a column that had missing values in training may be
left out: missing) or a list of values in column order. Values are parsed per column type
(:func:`app.core.encoding.parse_values`) and encoded by the version's encoding; a value of the
wrong type is a 422 naming the row and the column. Unknown categories are reported to the
caller, who serves them as "none of the known" or refuses them (``SKQK_UNKNOWN_CATEGORY``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.api.errors import ApiError
from app.api.rows import Where, feature_path, json_kind, schema_error
from app.core.encoding import EncodingError, parse_values, raw_json_rows
from app.core.features import FeatureSchema, SchemaError


@dataclass
class TableRows:
    x: np.ndarray  # float32 [N, encoded width]
    parsed: list[np.ndarray]  # per column
    unknown: list[tuple[int, np.ndarray]]  # (column index, rows mask) of unknown categories
    schema: FeatureSchema

    def raw_json(self) -> list[str]:
        assert self.schema.encoding is not None
        return raw_json_rows(self.schema.encoding.kinds, self.parsed)

    def first_unknown(self, where: Where) -> str | None:
        """The message for the first unknown category (by row), or None."""
        if not self.unknown:
            return None
        j, rows = min(self.unknown, key=lambda u: int(np.argmax(u[1])))
        r = int(np.argmax(rows))
        code = self.schema.encoding.columns[j]  # type: ignore[union-attr]
        shown = code.categories[:20]
        more = ", …" if len(code.categories) > 20 else ""
        return (f"{where(r)}{feature_path(code.name)}: unknown category {self.parsed[j][r]!r} "
                f"(known: {', '.join(map(repr, shown))}{more})")

    def unknown_counts(self) -> dict[str, int]:
        names = self.schema.columns
        return {names[j]: int(rows.sum()) for j, rows in self.unknown}


def parse_table_rows(rows: Sequence[Any], schema: FeatureSchema, where: Where, field: str) -> TableRows:
    assert schema.encoding is not None
    if not rows:
        raise ApiError(422, f"{field}: must contain at least one row")
    names = schema.columns
    values: list[list[Any]] = []
    for i, row in enumerate(rows):
        if type(row) is dict:
            try:
                values.append(schema.row_from_object(row, where(i)))
            except SchemaError as exc:
                raise schema_error(exc) from None
        elif type(row) is list:
            if len(row) != len(names):
                raise ApiError(422, f"{where(i)}: expected {len(names)} values (columns {list(names)}), "
                                    f"got {len(row)}")
            values.append(row)
        else:
            raise ApiError(422, f"{where(i)}: expected an object keyed by column name or a list of "
                                f"{len(names)} values, got {json_kind(row)}")
    return table_rows_from_columns([list(col) for col in zip(*values, strict=True)], schema,
                                   lambda r, j: where(r) + feature_path(names[j]))


def table_rows_from_columns(columns: list[list[Any]], schema: FeatureSchema, path: Any) -> TableRows:
    """Per-column raw values → encoded rows; ``path(row, column index)`` names a bad value."""
    enc = schema.encoding
    assert enc is not None
    parsed = []
    for j, (code, col) in enumerate(zip(enc.columns, columns, strict=True)):
        try:
            parsed.append(parse_values(col, code.kind, code.name))
        except EncodingError as exc:
            raise ApiError(422, f"{path(exc.row, j)}: {exc.reason} (a {code.kind} feature)") from None
    x, unknown = enc.encode(parsed)
    return TableRows(x, parsed, unknown, schema)
