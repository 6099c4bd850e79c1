"""A version's column encoding: raw table values → the network's input vector.

Part of the model like the input normalisation (which then standardises the encoded vector),
so clients send the values of their table as they are: numbers, booleans, text, nulls.

Per column (in schema order), the encoded inputs are:
- numeric: the value; a missing one is the training median. Columns that had missing values
  in training get a second input, ``name:missing`` (1 where the value was missing).
- boolean: 0/1; a missing one is the training mode, with ``name:missing`` as for numeric.
- categorical: one-hot over the vocabulary (``name=value``: the most frequent values, at most
  ``cap`` of them, each seen at least ``min_count`` times), then ``name=<other>`` when training
  had values outside the vocabulary (rare ones), then ``name=<missing>`` when training had
  missing values. A value outside the vocabulary goes to ``<other>`` where there is one; else
  it is *unknown*: every input of the column is 0 ("none of the known"), and the caller is told.

Values arrive *parsed* (see :func:`parse_values`): numeric and boolean columns as float64
arrays with NaN for missing, categorical columns as object arrays of ``str`` or ``None``.
Pure numpy.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("numeric", "boolean", "categorical")
DEFAULT_CAP = 50  # categories per column at most; the rest share "<other>"
DEFAULT_MIN_COUNT = 5  # a value seen fewer times in training goes to "<other>"
OTHER, MISSING = "<other>", "<missing>"
MISSING_TEXT = frozenset({"", "na", "n/a", "nan", "null", "none", "nil", "-", "?"})  # lower-cased, trimmed
TRUE_TEXT = frozenset({"true", "t", "yes", "y", "1"})
FALSE_TEXT = frozenset({"false", "f", "no", "n", "0"})


class EncodingError(ValueError):
    """A value of the wrong type for its column; ``row`` (0-based) and ``column`` say where."""

    def __init__(self, reason: str, row: int, column: str) -> None:
        super().__init__(reason)
        self.reason, self.row, self.column = reason, row, column


@dataclass(frozen=True)
class ColumnCode:
    name: str
    kind: str
    categories: tuple[str, ...] = ()  # categorical: the vocabulary, in input order
    other: bool = False  # categorical: an "<other>" input for values outside the vocabulary
    missing: bool = False  # training had missing values: a missing indicator / "<missing>" input
    fill: float = 0.0  # numeric: the training median; boolean: the training mode

    @property
    def width(self) -> int:
        if self.kind == "categorical":
            return len(self.categories) + int(self.other) + int(self.missing)
        return 1 + int(self.missing)

    def input_names(self) -> list[str]:
        if self.kind != "categorical":
            return [self.name] + ([f"{self.name}:missing"] if self.missing else [])
        names = [f"{self.name}={c}" for c in self.categories]
        if self.other:
            names.append(f"{self.name}={OTHER}")
        if self.missing:
            names.append(f"{self.name}={MISSING}")
        return names

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": self.kind, "missing": self.missing}
        if self.kind == "categorical":
            d.update(categories=list(self.categories), other=self.other)
        else:
            d["impute"] = self.fill
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ColumnCode:
        return cls(name=str(d["name"]), kind=str(d["type"]),
                   categories=tuple(str(c) for c in d.get("categories") or ()),
                   other=bool(d.get("other", False)), missing=bool(d.get("missing", False)),
                   fill=float(d.get("impute", 0.0)))


@dataclass(frozen=True)
class Encoding:
    columns: tuple[ColumnCode, ...]

    def __post_init__(self) -> None:
        for c in self.columns:
            if c.kind not in KINDS:
                raise ValueError(f"column {c.name!r}: type must be one of {KINDS}, got {c.kind!r}")
        object.__setattr__(self, "_lookup", [
            {v: i for i, v in enumerate(c.categories)} if c.kind == "categorical" else None
            for c in self.columns])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(c.kind for c in self.columns)

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns)

    def input_names(self) -> list[str]:
        return [n for c in self.columns for n in c.input_names()]

    def groups(self) -> list[str]:
        """Each encoded input's original column name, in input order."""
        return [c.name for c in self.columns for _ in range(c.width)]

    def to_list(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.columns]

    @classmethod
    def from_list(cls, items: Sequence[dict[str, Any]]) -> Encoding:
        return cls(tuple(ColumnCode.from_dict(d) for d in items))

    # ---- fit -------------------------------------------------------------------------------
    @classmethod
    def fit(cls, names: Sequence[str], kinds: Sequence[str], parsed: Sequence[np.ndarray],
            cap: int = DEFAULT_CAP, min_count: int = DEFAULT_MIN_COUNT) -> Encoding:
        return cls(tuple(_fit_column(n, k, p, cap, min_count) for n, k, p in zip(names, kinds, parsed,
                                                                                  strict=True)))

    # ---- encode ----------------------------------------------------------------------------
    def encode(self, parsed: Sequence[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        """Parsed columns → float32 [N, width], and per column with unknown values (its index,
        a bool mask of the rows); those rows' inputs of that column are all 0."""
        n = len(parsed[0]) if parsed else 0
        out = np.zeros((n, self.width), np.float32)
        unknown: list[tuple[int, np.ndarray]] = []
        at = 0
        for j, (code, values) in enumerate(zip(self.columns, parsed, strict=True)):
            if code.kind == "categorical":
                bad = _one_hot(code, self._lookup[j], values, out, at)  # type: ignore[attr-defined]
                if bad is not None:
                    unknown.append((j, bad))
            else:
                v = np.asarray(values, dtype=np.float64)
                miss = np.isnan(v)
                out[:, at] = np.where(miss, code.fill, v)
                if code.missing:
                    out[:, at + 1] = miss
            at += code.width
        return out, unknown


def _fit_column(name: str, kind: str, values: np.ndarray, cap: int, min_count: int) -> ColumnCode:
    if kind == "categorical":
        counts = Counter(v for v in values.tolist() if v is not None)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        vocab = [v for v, k in ranked if k >= min_count][:cap] or [v for v, _ in ranked[:cap]]
        return ColumnCode(name, kind, categories=tuple(vocab), other=len(vocab) < len(counts),
                          missing=any(v is None for v in values.tolist()))
    v = np.asarray(values, dtype=np.float64)
    miss = np.isnan(v)
    seen = v[~miss]
    if kind == "boolean":
        fill = float(seen.mean() >= 0.5) if seen.size else 0.0
    else:
        fill = float(np.median(seen)) if seen.size else 0.0
    return ColumnCode(name, kind, missing=bool(miss.any()), fill=fill)


def _one_hot(code: ColumnCode, lookup: dict[str, int], values: np.ndarray, out: np.ndarray,
             at: int) -> np.ndarray | None:
    k = len(code.categories)
    idx = _category_codes(code, lookup, values)
    rows = np.arange(len(idx))
    known = idx >= 0
    out[rows[known], at + idx[known]] = 1.0
    missing = idx == -2
    if code.missing:
        out[rows[missing], at + k + int(code.other)] = 1.0
    outside = idx == -1
    if not outside.any():
        return None
    if code.other:
        out[rows[outside], at + k] = 1.0
        return None
    return outside


def _category_codes(code: ColumnCode, lookup: dict[str, int], values: np.ndarray) -> np.ndarray:
    """Per value: its vocabulary index, -1 outside the vocabulary, -2 missing. In C through
    pyarrow's index_in for large columns (file imports), a dict lookup per value otherwise."""
    if len(values) >= 1024:
        try:
            import pyarrow as pa
            import pyarrow.compute as pc
        except ImportError:  # pragma: no cover
            pass
        else:
            arr = pa.array(values, type=pa.string(), from_pandas=True)
            found = pc.index_in(arr, value_set=pa.array(code.categories, pa.string()))
            idx = np.asarray(pc.fill_null(found, -1).cast(pa.int64()))
            missing = np.asarray(pc.is_null(arr))
            return np.where(missing, -2, idx)
    vals = values.tolist()
    return np.fromiter((lookup.get(v, -1) if v is not None else -2 for v in vals), np.int64, count=len(vals))


# ---- parsing raw values ----------------------------------------------------------------------
def is_missing_text(text: str) -> bool:
    return text.strip().lower() in MISSING_TEXT


def parse_values(values: Sequence[Any], kind: str, column: str) -> np.ndarray:
    """JSON-like values of one column (numbers, booleans, strings, None) → the parsed column.

    Numeric: finite numbers (or numeric text); boolean: true/false, 0/1 and the words in
    TRUE_TEXT / FALSE_TEXT; categorical: text (numbers become their text; an integral float
    is written as an integer). None, NaN and the MISSING_TEXT words are missing everywhere.
    Raises :class:`EncodingError` at the first value of the wrong type.
    """
    if kind == "categorical":
        return np.array([_category(v, i, column) for i, v in enumerate(values)] or [], dtype=object)
    parse = _number if kind == "numeric" else _boolean
    return np.fromiter((parse(v, i, column) for i, v in enumerate(values)), np.float64, count=len(values))


def _number(v: Any, row: int, column: str) -> float:
    t = type(v)
    if t is float or t is int:
        f = float(v)
        if math.isinf(f):
            raise EncodingError("value is not a finite number", row, column)
        return f
    if v is None:
        return math.nan
    if t is str:
        if is_missing_text(v):
            return math.nan
        try:
            f = float(v)
        except ValueError:
            raise EncodingError(f"{_show(v)} is not a number", row, column) from None
        if not math.isfinite(f):
            raise EncodingError(f"{_show(v)} is not a finite number", row, column)
        return f
    raise EncodingError(f"expected a number or null, got {_json_kind(v)}", row, column)


def _boolean(v: Any, row: int, column: str) -> float:
    if v is None:
        return math.nan
    t = type(v)
    if t is bool:
        return float(v)
    if (t is int or t is float) and v in (0, 1):
        return float(v)
    if t is float and math.isnan(v):
        return math.nan
    if t is str:
        s = v.strip().lower()
        if s in TRUE_TEXT:
            return 1.0
        if s in FALSE_TEXT:
            return 0.0
        if s in MISSING_TEXT:
            return math.nan
    raise EncodingError(f"{_show(v)} is not a boolean (true/false, yes/no, 1/0)", row, column)


def _category(v: Any, row: int, column: str) -> str | None:
    t = type(v)
    if t is str:
        return None if is_missing_text(v) else v.strip()
    if v is None:
        return None
    if t is bool:
        return "true" if v else "false"
    if t is int:
        return str(v)
    if t is float:
        if math.isnan(v):
            return None
        return str(int(v)) if v.is_integer() else repr(v)
    raise EncodingError(f"expected text or null, got {_json_kind(v)}", row, column)


def _show(v: Any) -> str:
    text = str(v)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    return {str: "string", list: "array", dict: "object", int: "integer", float: "number"}.get(
        type(v), type(v).__name__)


# ---- raw rows as stored ----------------------------------------------------------------------
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def raw_json_rows(kinds: Sequence[str], parsed: Sequence[np.ndarray]) -> list[str]:
    """Per row, its parsed values as a JSON array in column order (what the store keeps):
    numbers, true/false, text, null for missing. Vectorised with pyarrow when it is there
    (file imports: a million rows), else one ``json`` call per row."""
    try:
        return _raw_json_arrow(kinds, parsed)
    except ImportError:  # pragma: no cover - pyarrow is in every install that reads files
        pass
    cols: list[list[Any]] = []
    for kind, values in zip(kinds, parsed, strict=True):
        if kind == "categorical":
            cols.append(values.tolist())
            continue
        v = np.asarray(values, dtype=np.float64)
        obj = (v.astype(bool) if kind == "boolean" else v).astype(object)
        obj[np.isnan(v)] = None
        cols.append(obj.tolist())
    return [_dumps(row) for row in zip(*cols, strict=True)]


def _raw_json_arrow(kinds: Sequence[str], parsed: Sequence[np.ndarray]) -> list[str]:
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(parsed[0]) if parsed else 0
    null = pa.scalar("null")
    tokens = []
    for kind, values in zip(kinds, parsed, strict=True):
        if kind == "categorical":
            text = pa.array(values, type=pa.string(), from_pandas=True)
            if pc.any(pc.match_substring_regex(text, "[\x00-\x1f]")).as_py():  # rare: json escapes them
                tok = pa.array([None if v is None else _dumps(v) for v in values.tolist()], pa.string())
            else:
                esc = pc.replace_substring(pc.replace_substring(text, "\\", "\\\\"), '"', '\\"')
                tok = pc.binary_join_element_wise(pa.scalar('"'), esc, pa.scalar('"'), "")
        else:
            v = np.asarray(values, dtype=np.float64)
            miss = pa.array(np.isnan(v))
            if kind == "boolean":
                tok = pa.array(np.where(v == 1, "true", "false"), pa.string())
            else:
                tok = pc.cast(pa.array(v), pa.string())
            tok = pc.if_else(miss, pa.scalar(None, pa.string()), tok)
        tokens.append(pc.fill_null(tok, null))
    if not tokens:
        return ["[]"] * n
    joined = pc.binary_join_element_wise(*tokens, ",")
    return pc.binary_join_element_wise(pa.scalar("["), joined, pa.scalar("]"), "").to_pylist()


def parse_raw_rows(kinds: Sequence[str], rows: Sequence[str]) -> list[np.ndarray]:
    """Stored raw rows (JSON arrays) → parsed columns, to encode them again."""
    values = [json.loads(r) for r in rows]
    return [parse_values([row[j] for row in values], kind, str(j)) for j, kind in enumerate(kinds)]
