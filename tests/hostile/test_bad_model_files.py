"""``skqk import`` of files that are not what their suffix says, or that use an opset nothing
here can run (issue 20, item 7): a clear message and exit 2, no traceback (it was exit 1 with
a protobuf/onnxruntime traceback), nothing stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.owndata.conftest import sample_count, skqk


def _future_opset(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "B")
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Gemm", ["h", "W", "B"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 99)]), path)


CASES = {
    "random.onnx": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "not an ONNX model"),
    "text.onnx": (lambda p: p.write_text("hello, I am not a model\n" * 50), "not an ONNX model"),
    "future-opset.onnx": (_future_opset, "opset 99 is newer"),
    "random.pt2": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(5000)),
                   "not a torch.export archive"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_model_file_is_refused_cleanly(tmp_path: Path, name: str) -> None:
    make, expected = CASES[name]
    path = tmp_path / name
    make(path)
    np.savez(tmp_path / "d.npz", x=np.random.rand(40, 4).astype(np.float32), y=np.zeros(40, dtype=np.int64))
    data_dir = tmp_path / "data"
    run = skqk(data_dir, "import", str(path), "--data", str(tmp_path / "d.npz"), "--label-column", "y")
    out = " ".join((run.stdout + run.stderr).split())
    assert run.returncode == 2, out[-2000:]
    assert expected in out and "Traceback" not in out, out[-2000:]
    assert sample_count(data_dir) == 0
