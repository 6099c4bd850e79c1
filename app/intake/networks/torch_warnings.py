"""torch's own deprecation warnings during an import, said once instead of at every call.

Loading and decomposing a ``torch.export`` program calls torch internals that may warn about
their own deprecations (``FutureWarning`` raised inside torch, e.g. ``guard_size_oblivious``
while ``run_decompositions`` traces shapes). They say nothing the user can act on, and an
import reaches them several times (the program is walked as exported, then decomposed, then run
to compare outputs), so the terminal showed the same warning twice per import. Within
:func:`torch_deprecations_once` such a warning is logged once (``skqk.import`` at INFO); any
other warning goes on as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

log = logging.getLogger("skqk.import")


def _torch_dir() -> str:
    import torch

    return os.path.dirname(torch.__file__)


def _from_torch(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_torch_dir() + os.sep)


@contextlib.contextmanager
def torch_deprecations_once() -> Iterator[list[str]]:
    """Collect torch-internal FutureWarnings/DeprecationWarnings; log each message once at the end."""
    said: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield said
    for w in caught:
        text = str(w.message)
        if issubclass(w.category, (FutureWarning, DeprecationWarning)) and _from_torch(w.filename):
            if text not in said:
                said.append(text)
                log.info("torch (internal, nothing to do): %s", text.splitlines()[0] if text else w.category)
        else:  # not torch's own: as if we had not been here
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
