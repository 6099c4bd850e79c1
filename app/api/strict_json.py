"""Duplicate object keys in request JSON: a 400 naming the key and where, found cheaply.

JSON parsers (orjson, pydantic's) keep the last of a duplicated key silently, so
``{"label": 99, "label": 1}`` would be stored as label 1. Finding duplicates exactly takes a
second, slower parse (``json.loads`` with ``object_pairs_hook``), so it only runs when a cheap
count cannot rule them out: outside strings a ``:`` occurs only after an object key, so a text
with at most as many colons as its parsed objects hold keys lost no key to a duplicate. A
``{"inputs": [[…]]}`` body has one colon: two ``memchr`` scans and done.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import BaseModel

_COLON = 0x3A
_SMALL = 16 * 1024  # up to this size one bytes.count() is cheapest
_SPARSE = 16  # larger: up to this many colons, memchr them one by one; beyond, count with numpy


def _colons(body: bytes) -> int:
    if len(body) <= _SMALL:
        return body.count(b":")
    n, at = 0, body.find(b":")
    while at >= 0:
        n += 1
        if n > _SPARSE:  # dense: one vectorised pass beats a Python loop of find()s
            return int(np.count_nonzero(np.frombuffer(body, np.uint8) == _COLON))
        at = body.find(b":", at + 1)
    return n


_SCALARS = frozenset({float, int, str, bool, type(None)})


def _is_node(v: Any) -> bool:
    t = type(v)
    return t is dict or t is list or (t not in _SCALARS and isinstance(v, BaseModel))


def _holds_keys(root: Any, target: int) -> bool:
    """Whether the parsed tree (dicts, lists, validated pydantic models) holds ``target`` keys.

    Level by level, counting a level's keys before looking below it and stopping as soon as
    the count is reached: the rows and number lists of a typical body are never walked.
    A model counts the fields its JSON named plus kept extras (ignored extras are not
    counted: such a body just takes the exact check). Undercounting only costs time; a
    model whose ``mode="before"`` validator added fields would overcount, so request models
    must not have one.
    """
    keys = 0
    level = [root] if _is_node(root) else []  # a bare string, number … holds no keys
    while level:
        for node in level:
            t = type(node)
            if t is dict:
                keys += len(node)
            elif t is not list:
                keys += len(node.__pydantic_fields_set__) + len(node.__pydantic_extra__ or ())
        if keys >= target:
            return True
        below = []
        for node in level:
            t = type(node)
            if t is dict:
                children: Any = node.values()
            elif t is list:
                children = node
            else:
                children = [*node.__dict__.values(), *(node.__pydantic_extra__ or {}).values()]
            for v in children:  # inline _is_node: this loop is the hot part
                tv = type(v)
                if tv is dict or tv is list or (tv not in _SCALARS and isinstance(v, BaseModel)):
                    below.append(v)
        level = below
    return False


def may_have_duplicate_keys(body: bytes, parsed: Any) -> bool:
    """False when ``parsed`` (``body`` parsed by a strict JSON parser) certainly lost no key."""
    first = body.find(b":")
    if first < 0 or body.find(b":", first + 1) < 0:
        return False  # at most one key in the whole text (the usual /predict body)
    return not _holds_keys(parsed, _colons(body))


class _Object(dict):
    """A parsed object that remembers its first duplicated key."""

    duplicate: str | None = None


_NESTED = (_Object, list)


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                obj.duplicate = key
                break
            seen.add(key)
    return obj


def _skip(_text: str) -> None:
    return None


def _step(key: str) -> str:
    """A path step as the other messages write it: ``.label``, ``['mean radius']``."""
    return f".{key}" if key.isidentifier() else f"[{key[:100]!r}]"


def duplicate_key_message(body: bytes) -> str | None:
    """The exact check: ``'samples[0]: duplicate key "label"'`` for the first duplicate, or None.

    Only for a body a strict parser accepted (``orjson``, pydantic's).
    """
    try:  # numbers stay unconverted: faster, and no limit on an integer's digits
        root = json.loads(body, object_pairs_hook=_object, parse_int=_skip, parse_float=_skip,
                          parse_constant=_skip)
    except RecursionError:  # fail closed: what cannot be checked is not accepted
        return "body: nested too deeply to check for duplicate keys"
    except ValueError as exc:  # not seen in practice: the strict parser accepted the same text
        return f"body: cannot be checked for duplicate keys ({exc})"
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:  # depth-first, in document order
        node, path = stack.pop()
        if type(node) is _Object:
            if node.duplicate is not None:
                where = path[1:] if path.startswith(".") else path or "body"
                return f"{where}: duplicate key {json.dumps(node.duplicate[:100])}"
            items = [(v, path + _step(k)) for k, v in node.items() if type(v) in _NESTED]
        elif type(node) is list:
            items = [(v, f"{path}[{i}]") for i, v in enumerate(node) if type(v) in _NESTED]
        else:
            continue
        stack.extend(reversed(items))
    return None
