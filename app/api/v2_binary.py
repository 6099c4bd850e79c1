"""The binary tensor data extension of the Open Inference Protocol (Triton's; KServe has it too).

Request: the body's first ``Inference-Header-Content-Length`` bytes are the JSON request; the
bytes after it are the raw tensors of the inputs whose ``parameters`` carry
``binary_data_size``, one after another in input order (little-endian, row-major, no padding).
Without the header the whole body is JSON, as before.

Response: an output whose request asked for ``"parameters": {"binary_data": true}`` (or every
output without its own flag, under the request parameter ``binary_data_output``) goes after
the JSON answer as raw bytes, its JSON entry carrying ``binary_data_size`` instead of
``data``; the answer then has ``Content-Type: application/octet-stream`` and the JSON part's
length in ``Inference-Header-Content-Length``. BYTES elements are a 4-byte little-endian
length followed by the UTF-8 bytes.

Framing errors (header, sizes, data given twice) are 400s naming the header or the input;
what the values mean (shape, datatype, finiteness) stays with :mod:`app.api.inference`.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import orjson

from app.api.errors import ApiError
from app.api.schemas import V2InferRequest, V2Tensor

HEADER = "Inference-Header-Content-Length"
HEADER_KEY = HEADER.lower().encode()  # as ASGI spells header names
OCTET_STREAM = "application/octet-stream"
V2_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
FP32 = np.dtype("<f4")
INT64 = np.dtype("<i8")
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_SIZE = "parameters.binary_data_size"
_NOTHING = memoryview(b"")


def is_v2_infer(path: str) -> bool:
    return V2_INFER_PATH.match(path) is not None


# ---- requests -------------------------------------------------------------------------------------
def header_length(raw: str | bytes | None, body_size: int) -> int | None:
    """The JSON header's length from the HTTP header (None when absent); 400 when unusable."""
    if raw is None:
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()):  # no sign, no "1_0", no unicode digits
        shown = text.decode("latin-1") if isinstance(text, bytes) else text
        raise ApiError(400, f"{HEADER} header: must be a non-negative integer (the length of the JSON "
                            f"part of the body), got {shown[:40]!r}")
    n = int(text)
    if n > body_size:
        raise ApiError(400, f"{HEADER} header: {n} bytes, longer than the whole body ({body_size} bytes)")
    return n


def split_body(body: bytes, length: int | None) -> tuple[bytes, memoryview]:
    """(the JSON part, the binary part); without the header it is all JSON."""
    if length is None or length == len(body):
        return body, _NOTHING
    return body[:length], memoryview(body)[length:]


def json_part_name(length: int | None) -> str:
    """How parse errors name the JSON part (so a wrong header length shows up as such)."""
    return "request body" if length is None else f"JSON inference header (the first {length} bytes, {HEADER})"


def missing_header_hint(exc: ApiError, body: bytes, length: int | None) -> ApiError:
    """A body that is not JSON but declares binary inputs: say which header it lacks."""
    if length is None and exc.status == 400 and b'"binary_data_size"' in body:
        return ApiError(400, f"{exc.message} (binary tensor data needs the {HEADER} header: the length "
                             "of the JSON part of the body)")
    return exc


def _declared_size(tensor: V2Tensor, i: int) -> int | None:
    params = tensor.parameters
    if not params or "binary_data_size" not in params:
        return None
    size = params["binary_data_size"]
    if type(size) is not int or size < 0:
        raise ApiError(400, f"inputs[{i}].{_SIZE}: must be a non-negative integer, got {size!r}")
    return size


def input_bytes(req: V2InferRequest, rest: memoryview, length: int | None) -> list[memoryview | None]:
    """Each input's raw bytes (None: its values are JSON ``data``); 400 when the framing is off.

    The declared sizes must add up to exactly the bytes after the JSON part.
    """
    tensors = req.inputs
    if length is None and all(t.parameters is None for t in tensors):  # plain JSON: the usual case
        return [None] * len(tensors)
    sizes = [_declared_size(t, i) for i, t in enumerate(tensors)]
    binary = [i for i, s in enumerate(sizes) if s is not None]
    if not binary:
        if len(rest):
            raise ApiError(400, f"{HEADER} header: {len(rest)} bytes follow the JSON part, but no input "
                                f"has {_SIZE}")
        return [None] * len(tensors)
    for i in binary:
        if tensors[i].data is not None:
            raise ApiError(400, f"inputs[{i}]: has both data and {_SIZE}; send its values one way")
    if length is None:
        raise ApiError(400, f"inputs[{binary[0]}].{_SIZE}: binary tensor data needs the {HEADER} header "
                            "(the length of the JSON part of the body)")
    total = sum(s for s in sizes if s is not None)
    if total != len(rest):
        last = binary[-1]
        raise ApiError(400, f"inputs[{last}].{_SIZE}: the binary inputs declare {total} bytes in all, but "
                            f"{len(rest)} bytes follow the JSON part ({HEADER}: {length})")
    out: list[memoryview | None] = [None] * len(tensors)
    at = 0
    for i in binary:
        size = sizes[i]
        assert size is not None
        out[i] = rest[at:at + size]
        at += size
    return out


def fp32_values(raw: memoryview, tensor: V2Tensor, i: int) -> np.ndarray:
    """An input's binary FP32 values, flat (a writable copy); 400 for a wrong size, 422 for NaN/inf."""
    expected = math.prod(tensor.shape) * FP32.itemsize
    if len(raw) != expected:
        raise ApiError(400, f"inputs[{i}].{_SIZE}: {len(raw)} bytes, but shape {tensor.shape} of FP32 "
                            f"needs {expected}")
    x = np.frombuffer(raw, dtype=FP32).astype(np.float32)  # copies: torch wants a writable array
    finite = np.isfinite(x)
    if not finite.all():
        raise ApiError(422, f"inputs[{i}] (binary data)[{int(np.argmin(finite))}]: value is not a finite "
                            "number")
    return x


# ---- responses ------------------------------------------------------------------------------------
def _flag(params: dict[str, Any] | None, key: str, where: str, default: bool) -> bool:
    if not params or key not in params:
        return default
    value = params[key]
    if type(value) is not bool:
        raise ApiError(422, f"{where}.{key}: must be true or false, got {value!r}")
    return value


def binary_outputs(req: V2InferRequest, count: int) -> list[bool]:
    """Per answered output: binary or JSON (an output's own flag wins over ``binary_data_output``)."""
    default = _flag(req.parameters, "binary_data_output", "parameters", False)
    if not req.outputs:
        return [default] * count
    flags = []
    for i, out in enumerate(req.outputs):
        if out.parameters and "classification" in out.parameters:
            raise ApiError(422, f"outputs[{i}].parameters.classification: the classification extension "
                                "is not supported; ask for logits or predictions")
        flags.append(_flag(out.parameters, "binary_data", f"outputs[{i}].parameters", default))
    return flags


@lru_cache(maxsize=16)
def _prefixed(names: tuple[str, ...]) -> tuple[bytes, ...]:
    """Each class name as one BYTES element: 4-byte little-endian length + UTF-8."""
    return tuple(struct.pack("<I", len(b)) + b for b in (n.encode() for n in names))


def fp32_bytes(values: np.ndarray) -> bytes:
    return values.astype(FP32, copy=False).tobytes()


def int64_bytes(values: np.ndarray) -> bytes:
    return values.astype(INT64, copy=False).tobytes()


def names_bytes(names: tuple[str, ...], indices: np.ndarray) -> bytes:
    table = _prefixed(names)
    return b"".join([table[i] for i in indices.tolist()])


@dataclass(frozen=True, slots=True)
class BinaryAnswer:
    """A v2 answer with binary outputs: the JSON part, then each binary output's bytes in order."""

    header: dict[str, Any]
    blobs: Sequence[bytes]

    def encode(self) -> tuple[bytes, int]:
        """(the body, the JSON part's length)."""
        head = orjson.dumps(self.header, option=_JSON_OPTS)
        return b"".join((head, *self.blobs)), len(head)


def encode_answer(payload: dict[str, Any] | BinaryAnswer) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A v2 infer answer → (body, ASGI headers other than Content-Length)."""
    if type(payload) is BinaryAnswer:
        body, length = payload.encode()
        return body, [(b"content-type", OCTET_STREAM.encode()), (HEADER_KEY, str(length).encode())]
    return orjson.dumps(payload, option=_JSON_OPTS), [(b"content-type", b"application/json")]


# ---- OpenAPI ----------------------------------------------------------------------------------------
_BINARY_BODY = {"type": "string", "format": "binary"}


def document_binary(doc_op: dict[str, Any]) -> None:
    """Add the binary variant to a documented v2 infer operation: body, header, answer."""
    body = doc_op.get("requestBody")
    if body is not None:
        body["content"][OCTET_STREAM] = {"schema": {
            **_BINARY_BODY, "description": f"the JSON request (its length in {HEADER}), then the raw "
                                           "little-endian FP32 bytes of each input with "
                                           "parameters.binary_data_size, in input order"}}
    params = doc_op.setdefault("parameters", [])
    if not any(p.get("name") == HEADER for p in params):
        params.append({"name": HEADER, "in": "header", "required": False,
                       "schema": {"type": "integer", "minimum": 0},
                       "description": "binary tensor data: the length in bytes of the JSON part at the "
                                      "start of the body (absent: the whole body is JSON)"})
    ok = doc_op.get("responses", {}).get("200")
    if ok is not None:
        ok["content"][OCTET_STREAM] = {"schema": {
            **_BINARY_BODY, "description": "when an output was asked for as binary: the JSON answer, then "
                                           "each binary output's bytes in order"}}
        ok.setdefault("headers", {})[HEADER] = {
            "description": "with an application/octet-stream answer: the length of its JSON part",
            "required": False, "schema": {"type": "string"}}
