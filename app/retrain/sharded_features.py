"""The feature pass of a QK retrain, sharded across Celery workers (``SKQK_RETRAIN_SHARDS``).

The pass is embarrassingly parallel: every block of ids is computed on its own and written to
the feature cache. The retrain task splits the stale blocks into ``shards`` contiguous id
ranges and sends all but the first as a Celery ``group`` of ``workers.tasks.feature_shard``
tasks (same queue as retrains); it computes the first itself, then *steals* blocks of the other
shards that no worker has claimed yet, so a deployment with one free worker, or none, still
finishes, and the slowest shard never holds the job up. The fan-in is the retrain task itself:
once every block is valid it runs the one readout refit — the chord body of a
``group → refit`` canvas — in the task that holds the job's lock, heartbeat and fence.

Blocks are claimed with a file lock on the cache's file system and never replaced once valid
(:mod:`app.retrain.feature_cache`), so a shard that starts late finds its blocks done and exits,
and the refit reads exactly the blocks one worker alone would have computed. The workers must
share the feature cache directory (``SKQK_FEATURE_CACHE_DIR`` on a common volume) and the store.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from app.core.network import DecoupledModel
from app.distributed import GPU_QUEUE
from app.retrain.cached_features import CancelHook, FeaturePass, ensure_block
from app.retrain.feature_cache import FeatureCache
from app.retrain.sample_stream import DataWindow
from app.storage import Store

log = logging.getLogger("skqk.retrain")

SHARD_TASK = "workers.tasks.feature_shard"


def split_shards(todo: list[int], shards: int) -> list[list[int]]:
    """Contiguous runs of blocks (reading neighbouring ids is cheaper for the store)."""
    return [[int(i) for i in part] for part in np.array_split(np.asarray(todo, dtype=np.int64), shards)
            if len(part)]


def sharded_pass(shards: int) -> Callable[[int], FeaturePass]:
    """A feature pass over ``shards`` Celery tasks, for the champion ``version``."""

    def for_version(version: int) -> FeaturePass:
        def run(store: Store, cache: FeatureCache, model: DecoupledModel, window: DataWindow,
                todo: list[int], audit_mark: int, check_cancel: CancelHook) -> None:
            from celery import group, signature

            parts = split_shards(todo, shards)
            header = [signature(SHARD_TASK, args=(version, cache.key, asdict(window), cache.block_ids,
                                                  audit_mark, part), queue=GPU_QUEUE, immutable=True)
                      for part in parts[1:]]
            sent = group(header).apply_async() if header else None
            log.info("feature pass: %d blocks in %d shards (%d sent to other workers)", len(todo),
                     len(parts), len(header))
            busy: list[int] = []
            # own shard first, then the others from their far end (their worker starts at the front)
            for order in [parts[0], *[list(reversed(p)) for p in parts[1:]]]:
                for index in order:
                    check_cancel()
                    if ensure_block(store, cache, model, window, index, audit_mark, wait=False) is None:
                        busy.append(index)  # another worker is computing it
            for index in busy:  # wait for those, or do them if their worker gave up
                check_cancel()
                ensure_block(store, cache, model, window, index, audit_mark)
            if sent is not None:  # shards no worker started have nothing left to do
                with contextlib.suppress(Exception):
                    sent.revoke()

        return run

    return for_version


def run_shard(store: Store, cache_root: Path, version_model: DecoupledModel, key: str, window: dict,
              block_ids: int, audit_mark: int, indices: list[int]) -> list[int]:
    """The body of ``workers.tasks.feature_shard``: the blocks it computed (others were valid)."""
    from app.retrain.feature_cache import feature_key

    if feature_key(version_model) != key:  # the version's weights are not what the job cached
        raise ValueError("feature shard: the version's weights do not match the job's feature key")
    w = DataWindow(**window)
    cache = FeatureCache(cache_root, key, block_ids, w.modulo)
    cache.dir.mkdir(parents=True, exist_ok=True)
    return [i for i in indices if ensure_block(store, cache, version_model, w, i, audit_mark)]
