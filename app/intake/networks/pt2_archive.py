"""Read a ``torch.export.save`` archive without ever executing code from it.

``torch.export.load`` is not safe on untrusted files: the sample inputs are unpickled with
``weights_only=True`` and, if that fails, *again with ``weights_only=False``* (arbitrary
code); pickled weight/constant payloads, custom/opaque objects and the pre-2.8 archive format
go through plain pickle too. So every payload that torch would unpickle is checked here first,
from one in-memory copy of the file (no swap between check and load):

- the sample inputs and any legacy ``*.pt`` payload must load with ``weights_only=True``
  (then torch's own first, safe attempt succeeds and its unsafe fallback is never reached);
- weights/constants stored as pickles, script objects and opaque (pickled) objects are
  refused outright: an ``ExportedProgram`` of a plain network has only raw tensor payloads;
- an archive without ``models/*.json`` (the old format, loaded by another unsafe path) is
  refused.

A refusal names the entry; nothing from the file runs.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from app.intake.networks import UnsupportedModel

_CONFIGS = ("data/weights/", "data/constants/")


def _inner(name: str) -> str:
    """The entry's path below the archive's top folder (``m/data/x`` → ``data/x``)."""
    return name.split("/", 1)[1] if "/" in name else name


def _safe_unpickle(raw: bytes, name: str, what: str) -> None:
    """Raises unless ``raw`` loads under torch's restricted (``weights_only``) unpickler."""
    try:
        torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as e:  # anything the restricted unpickler refuses, or garbage
        raise UnsupportedModel(f"{what} {name!r} is not a plain tensor pickle (refused unread: loading it "
                               f"could run code from the file; {type(e).__name__}: {str(e)[:200]})") from None


def _check_config(raw: bytes, name: str) -> None:
    try:
        config = json.loads(raw)["config"]
        items = list(config.items())
    except Exception as e:
        raise UnsupportedModel(f"payload config {name!r} is not readable ({e})") from None
    for fqn, meta in items:
        if not isinstance(meta, dict):
            raise UnsupportedModel(f"payload config {name!r}: entry {fqn!r} is malformed")
        path = str(meta.get("path_name", ""))
        if meta.get("use_pickle"):
            raise UnsupportedModel(f"{fqn!r} is stored as a pickle in {name!r}; only raw tensor payloads "
                                   "are accepted (unpickling could run code from the file)")
        if "constants" in name and not path.startswith("tensor_"):
            raise UnsupportedModel(f"constant {fqn!r} ({path!r}) is a script/opaque object; only tensor "
                                   "constants are accepted (loading it could run code from the file)")


def checked_archive(path: str | Path) -> io.BytesIO:
    """The file's bytes, after every check above passed; give this (not the path) to torch."""
    data = Path(path).read_bytes()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except zipfile.BadZipFile as e:
        raise UnsupportedModel(f"not a torch.export archive (not a zip file: {e})") from None
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):  # zip readers differ on which duplicate they return
        raise UnsupportedModel("the archive has duplicate entry names; refused")
    if not any(_inner(n).startswith("models/") and n.endswith(".json") for n in names):
        raise UnsupportedModel("not a torch.export archive of this torch's format (no models/*.json; "
                               "re-export with torch.export.save from torch ≥ 2.8)")
    for info in infos:  # every entry, whatever top folder torch's reader would pick
        name, i = info.filename, _inner(info.filename)
        try:
            if i.startswith("data/sample_inputs/"):
                _safe_unpickle(zf.read(info), name, "sample inputs")
            elif i.startswith(_CONFIGS) and i.endswith("_config.json"):
                _check_config(zf.read(info), name)
            elif i.startswith(_CONFIGS) and i.endswith(".pt"):  # legacy one-pickle weights/constants
                _safe_unpickle(zf.read(info), name, "legacy payload")
        except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as e:  # e.g. a CRC mismatch
            raise UnsupportedModel(f"entry {name!r} is unreadable ({e})") from None
    return io.BytesIO(data)


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in this block is weights-only, even one torch calls with
    ``weights_only=False`` (its fallback after a failed safe load): the second line of defence
    behind :func:`checked_archive`, so a check this module misses still cannot run code."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                  "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # read by torch.load at each call
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
