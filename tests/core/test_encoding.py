"""The column encoding: fit (median, mode, vocabulary with cap / "<other>" / "<missing>"), exact
encoded vectors, unknown categories, value parsing, the schema round trip, raw rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.core.encoding import Encoding, EncodingError, parse_raw_rows, parse_values, raw_json_rows
from app.core.features import FeatureSchema, SchemaError

NAN = math.nan


def fitted() -> Encoding:
    names = ["city", "age", "member", "tier"]
    kinds = ["categorical", "numeric", "boolean", "categorical"]
    values = [
        ["a"] * 6 + ["b"] * 5 + ["c"] * 2 + [None],  # c is rare (< 5): "<other>"; one missing
        [1.0, 2.0, 3.0, NAN, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0],
        [1.0, 1.0, 0.0, 1.0, NAN, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0],
        ["x", "y"] * 7,
    ]
    parsed = [parse_values(v, k, n) for v, k, n in zip(values, kinds, names, strict=True)]
    return Encoding.fit(names, kinds, parsed)


def test_fit_records_types_vocabulary_and_imputation() -> None:
    enc = fitted()
    city, age, member, tier = enc.columns
    assert city.categories == ("a", "b") and city.other and city.missing
    assert age.fill == 8.0 and age.missing  # the median of the 13 seen values
    assert member.fill == 1.0 and member.missing
    assert set(tier.categories) == {"x", "y"} and not tier.other and not tier.missing
    assert enc.input_names() == ["city=a", "city=b", "city=<other>", "city=<missing>", "age", "age:missing",
                                 "member", "member:missing", *[f"tier={c}" for c in tier.categories]]
    assert enc.groups() == ["city"] * 4 + ["age"] * 2 + ["member"] * 2 + ["tier"] * 2


def test_encode_exact_vectors_and_unknowns() -> None:
    enc = fitted()
    tier = enc.columns[3].categories
    rows = [["b", 3.5, True, tier[0]], ["zzz", None, None, tier[1]], [None, 1.0, "no", "new"]]
    parsed = [parse_values([r[j] for r in rows], c.kind, c.name) for j, c in enumerate(enc.columns)]
    x, unknown = enc.encode(parsed)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, np.array([
        [0, 1, 0, 0, 3.5, 0, 1, 0, 1, 0],
        [0, 0, 1, 0, 8.0, 1, 1, 1, 0, 1],  # outside the vocabulary → <other>; missing → median/mode
        [0, 0, 0, 1, 1.0, 0, 0, 0, 0, 0],  # "new" in a column without <other>: none of the known
    ], np.float32))
    assert len(unknown) == 1 and unknown[0][0] == 3
    assert unknown[0][1].tolist() == [False, False, True]


def test_cap_keeps_the_most_frequent() -> None:
    values = [f"v{i}" for i in range(10) for _ in range(10 - i + 5)]
    enc = Encoding.fit(["c"], ["categorical"], [parse_values(values, "categorical", "c")], cap=3)
    assert enc.columns[0].categories == ("v0", "v1", "v2") and enc.columns[0].other


def test_parse_values() -> None:
    assert np.isnan(parse_values(["NA", None, " n/a "], "numeric", "x")).all()
    assert parse_values(["1.5", 2, 3.0], "numeric", "x").tolist() == [1.5, 2.0, 3.0]
    assert parse_values(["True", "no", "Y", 0, 1, False, None], "boolean", "b")[:6].tolist() == [
        1, 0, 1, 0, 1, 0]
    assert parse_values([2.0, 3, "  x ", "", True], "categorical", "c").tolist() == [
        "2", "3", "x", None, "true"]
    with pytest.raises(EncodingError) as e:
        parse_values([1.0, "abc"], "numeric", "size")
    assert (e.value.row, e.value.column) == (1, "size") and "'abc' is not a number" in str(e.value)
    with pytest.raises(EncodingError):
        parse_values(["maybe"], "boolean", "b")
    with pytest.raises(EncodingError):
        parse_values([[1]], "categorical", "c")
    with pytest.raises(EncodingError):
        parse_values([math.inf], "numeric", "x")


def test_schema_round_trip_and_rows() -> None:
    enc = fitted()
    schema = FeatureSchema(tuple(enc.input_names()), (enc.width,), num_classes=2, encoding=enc)
    again = FeatureSchema.from_dict(schema.to_dict())
    assert again == schema and again.encoding == enc
    assert schema.columns == ("city", "age", "member", "tier")
    assert schema.encoded_feature_groups() == enc.groups()
    # age, member and city had missing values: they may be left out; tier may not
    assert schema.row_from_object({"tier": "x"}, "r") == [None, None, None, "x"]
    with pytest.raises(SchemaError, match="missing feature 'tier'"):
        schema.row_from_object({"city": "a"}, "r")
    with pytest.raises(SchemaError, match=r"unknown feature 'cty'.*did you mean 'city'"):
        schema.row_from_object({"cty": "a", "tier": "x"}, "r")
    plain = FeatureSchema.default((3,), 2)
    assert "columns" not in plain.to_dict() and plain.encoded_feature_groups() == ["f0", "f1", "f2"]


def test_raw_rows_round_trip() -> None:
    enc = fitted()
    rows = [["b", 3.5, True, "x"], [None, None, None, "zz"]]
    parsed = [parse_values([r[j] for r in rows], c.kind, c.name) for j, c in enumerate(enc.columns)]
    raw = raw_json_rows(enc.kinds, parsed)
    assert raw == ['["b",3.5,true,"x"]', '[null,null,null,"zz"]']
    back = parse_raw_rows(enc.kinds, raw)
    np.testing.assert_array_equal(enc.encode(back)[0], enc.encode(parsed)[0])


def test_large_columns_encode_like_small_ones() -> None:
    """Columns of 1,024+ values take the vectorised category lookup: same vectors, same unknowns."""
    enc = fitted()
    gen = np.random.default_rng(0)
    rows = 3000
    cols = [gen.choice(np.array(["a", "b", "c", "q", None], dtype=object), rows),
            np.where(gen.random(rows) < 0.1, np.nan, gen.normal(size=rows)),
            np.where(gen.random(rows) < 0.1, np.nan, gen.random(rows) < 0.5).astype(np.float64),
            gen.choice(np.array(["x", "y", "new", None], dtype=object), rows)]
    big, big_unknown = enc.encode(cols)
    parts = [enc.encode([c[i:i + 500] for c in cols]) for i in range(0, rows, 500)]
    np.testing.assert_array_equal(big, np.concatenate([p[0] for p in parts]))
    (j, mask), = big_unknown
    assert j == 3
    np.testing.assert_array_equal(mask, np.concatenate([p[1][0][1] for p in parts]))
