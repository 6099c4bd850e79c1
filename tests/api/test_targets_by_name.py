"""Regression targets keyed by name (``{"t1": 0.3, "t2": 1.2}``) equal the same targets as a list;
an unknown or missing name is a 422 naming it."""

from __future__ import annotations

import numpy as np
import pytest

from app.api.errors import ApiError
from app.api.rows import parse_targets
from app.core.features import FeatureSchema


def schema() -> FeatureSchema:
    return FeatureSchema(("a", "b"), (2,), "regression", target_names=("t1", "t2"))


def where(i: int) -> str:
    return f"samples[{i}].label"


def test_targets_by_name_equal_lists() -> None:
    by_name = parse_targets([{"t2": 1.2, "t1": 0.3}, {"t1": -1, "t2": 5}], schema(), where)
    as_list = parse_targets([[0.3, 1.2], [-1, 5]], schema(), where)
    np.testing.assert_array_equal(by_name, as_list)


@pytest.mark.parametrize(("label", "message"), [
    ({"t1": 0.3}, "samples[0].label: missing target 't2'"),
    ({"t1": 0.3, "t2": 1.0, "t3": 2.0}, "samples[0].label: unknown target 't3'"),
    ({"t1": "x", "t2": 1.0}, "samples[0].label[0]: expected a number"),
])
def test_bad_named_targets(label: dict, message: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_targets([label], schema(), where)
    assert e.value.status == 422 and message in e.value.message
