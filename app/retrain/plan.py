"""Is there anything for a retrain to learn? "No new sample since the champion's watermark → no
new version, unless forced" (``POST /retrain``, ``skqk retrain``, and the metric that alert
rules pair with the last success time).

A sample is *new* when a retrain of the active version would use it and the active version
was not trained on it: its id is above the version's ``data_watermark`` (ids only grow), it
is not quarantined, and it fits the version's schema (its feature count; a class label for a
classifier, targets for a regression). Quarantined rows are left out of every retrain, so
they are not new data; rows deleted or released from quarantine below the watermark change
the data too but add nothing beyond it: pass ``force`` to retrain on such a change.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from app.core.spec import ArchSpec
from app.serving.version_schema import schema_of
from app.storage import Store
from app.storage.schema import samples

METRIC_CAP = 100_000  # skqk_retrain_new_samples counts this far: a backlog stays bounded work


@dataclass(frozen=True)
class RetrainPlan:
    active_version: int | None
    data_watermark: int | None  # the active version's; None: it records none (all rows are new)
    new_samples: int  # counted up to the ``cap`` it was asked with

    @property
    def nothing_new(self) -> bool:
        return self.active_version is not None and self.new_samples == 0

    def skip_reason(self) -> str:
        return (f"no new samples since the active version {self.active_version}'s data watermark "
                f"(sample id {self.data_watermark}): a retrain would learn nothing; "
                "pass force=true (skqk retrain --force) to retrain anyway")

    def skipped(self) -> dict[str, object]:
        """The answer of a skipped ``POST /retrain`` (and what ``skqk retrain`` prints)."""
        return {"status": "skipped", "reason": self.skip_reason(), "active_version": self.active_version,
                "data_watermark": self.data_watermark, "new_samples": 0}


def plan_retrain(store: Store, cap: int = 1) -> RetrainPlan:
    """The active version and how many new samples lie beyond its watermark (at most ``cap``:
    1 answers "any?" with one index probe; larger caps bound the work on a big backlog)."""
    active = store.active_version()
    if active is None:
        return RetrainPlan(None, None, 0)
    record = store.get_version(active, weights=False)
    if record is None:  # deleted under us: let the retrain itself say so
        return RetrainPlan(active, None, 0)
    spec = ArchSpec.from_dict(record.architecture)
    label = samples.c.targets if schema_of(record, spec).is_regression else samples.c.label
    rows = select(samples.c.id).where(samples.c.n_features == spec.input_dim, label.is_not(None),
                                      samples.c.quarantined_at.is_(None))
    if record.data_watermark is not None:
        rows = rows.where(samples.c.id > record.data_watermark)  # a primary-key range
    with store.engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(rows.limit(cap).subquery())).scalar_one()
    return RetrainPlan(active, record.data_watermark, int(count))
