"""A FutureWarning torch raises internally, several times during one import, is said once (logged),
not printed each time; other warnings pass through unchanged."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

from app.intake.networks.torch_warnings import torch_deprecations_once

TORCH_FILE = os.path.join(os.path.dirname(torch.__file__), "fx", "experimental", "symbolic_shapes.py")


def _torch_warns(message: str) -> None:  # as torch's own code would, from a file inside torch
    warnings.warn_explicit(message, FutureWarning, TORCH_FILE, 528)


def test_torch_future_warning_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="skqk.import")
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with torch_deprecations_once() as said:
            _torch_warns("guard_size_oblivious will be removed.")
            _torch_warns("guard_size_oblivious will be removed.")  # walked twice: the same warning
            warnings.warn("a warning of ours", UserWarning, stacklevel=1)
    assert said == ["guard_size_oblivious will be removed."]
    assert [str(w.message) for w in outside] == ["a warning of ours"]  # ours still shown, torch's not
    assert sum("guard_size_oblivious" in r.getMessage() for r in caplog.records) == 1
