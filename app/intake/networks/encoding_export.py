"""The encoding of an exported version, written beside its ONNX file as JSON.

The ONNX graph takes the *encoded* input vector (normalisation included in the graph, as in
the served model), not raw table rows: text cannot enter a plain float graph. The JSON holds
everything to build that vector from a raw row (see app.core.encoding): per column its type,
vocabulary with the "<other>" and "<missing>" inputs, imputation value and missing indicator,
in input order, plus each input's name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.core.features import FeatureSchema


def encoding_document(schema: FeatureSchema) -> dict[str, Any]:
    assert schema.encoding is not None
    return {
        "format": "skqk-encoding/1",
        "graph_input": {"name": "input", "shape": [-1, schema.input_dim], "encoded": True},
        "input_names": list(schema.feature_names),
        "columns": schema.encoding.to_list(),
        "rules": {
            "numeric": "value, or 'impute' when missing; then, if 'missing', 1 when missing else 0",
            "boolean": "1/0, or 'impute' when missing; then, if 'missing', 1 when missing else 0",
            "categorical": "one-hot over 'categories'; a value outside them: the '<other>' input if "
                           "'other', else all 0; missing: the '<missing>' input if 'missing', else all 0",
        },
    }


def write_encoding(schema: FeatureSchema, onnx_path: str | Path) -> Path:
    side = Path(onnx_path).with_suffix(".encoding.json")
    side.write_text(json.dumps(encoding_document(schema), indent=2))
    return side
