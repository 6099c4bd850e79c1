"""Small helpers shared by the experiments: mean ± std, markdown tables, JSON, matplotlib setup."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def pm(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float))


def pyplot():
    """matplotlib.pyplot with a headless backend (imported lazily: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # committed PNGs are viewed at their own size: no text below ~12 px at FIG_DPI
    matplotlib.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
                                "legend.fontsize": 9, "xtick.labelsize": 9, "ytick.labelsize": 9})
    return plt


FIG_DPI = 110


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as a small palette PNG (the docs keep a few of these)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    try:
        from PIL import Image

        with Image.open(path) as img:
            small = img.convert("RGB").quantize(colors=128)
        small.save(path, optimize=True)
    except (ImportError, OSError):  # keep the full-colour file
        pass
