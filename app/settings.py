"""Service settings: pydantic-settings, environment prefix ``SKQK_``.

Every field can be set as ``SKQK_<FIELD>`` (e.g. ``SKQK_DATABASE_URL``). ``get_settings()``
returns one cached instance; tests build their own ``Settings(...)``.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import time
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("skqk.settings")

API_KEY_FILE = "api_key"


def _read_secret(path: Path, variable: str) -> str:
    """A value kept in a file (Docker/Kubernetes secrets), stripped; a clear error if unusable."""
    try:
        value = path.read_text().strip()
    except OSError as exc:  # missing, a directory (compose made one for a missing secret), no access
        raise ValueError(f"{variable}={path}: cannot read it ({exc.strerror})") from None
    if not value:
        raise ValueError(f"{variable}={path} is empty")
    return value


class Settings(BaseSettings):
    # hide_input_in_errors: a bad setting must not print the others (the API key among them)
    model_config = SettingsConfigDict(env_prefix="SKQK_", extra="ignore", hide_input_in_errors=True)

    # ---- where things live --------------------------------------------------------------
    data_dir: Path = Field(Path("./skqk-data"), description="SQLite file, API key file, caches")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///{data_dir}/skqk.db")
    database_url_secret: Path | None = Field(
        None, validation_alias="SKQK_DATABASE_URL_FILE",
        description="file holding the URL (a Docker secret); SKQK_DATABASE_URL wins when both are set")
    redis_url: str | None = Field(None, description="unset: embedded mode (no Redis, in-process retrain)")
    model_name: str = Field("skqk", description="model name in the Open Inference Protocol v2 paths")
    api_key: str | None = Field(None, description="admin key (X-API-Key); unset: generated into data_dir")
    # scoped keys (app/api/auth.py): the admin key works everywhere; unset, the scope is open
    ingest_api_key: str | None = Field(None, description="X-API-Key for POST /ingest; unset: /ingest is open")
    ingest_api_key_file: Path | None = Field(
        None, description="file holding the ingest key; SKQK_INGEST_API_KEY wins when both are set")
    predict_api_key: str | None = Field(
        None, description="X-API-Key for /predict and v2 infer; unset: they are open")
    predict_api_key_file: Path | None = Field(
        None, description="file holding the predict key; SKQK_PREDICT_API_KEY wins when both are set")

    api_key_secret: Path | None = Field(
        None, validation_alias="SKQK_API_KEY_FILE",
        description="file holding the admin key (a Docker secret); SKQK_API_KEY wins when both are set")
    _from_files: dict[str, tuple[str, Path]] = PrivateAttr(default_factory=dict)  # field → (variable, file)

    # ---- HTTP ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(1, ge=1)
    log_level: str = "info"
    access_log: bool = False
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="request body limit (413 above)")
    fast_path: bool = Field(True, description="answer /predict and v2 infer below FastAPI's routing")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must arrive within this (from the connection or "
                                "the request's first byte); else 408 and the connection is closed")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within this "
                                                          "after its headers (408 and close otherwise)")
    max_inflight_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="bodies over 64 KiB being read or handled at once, in "
                                               "bytes; a body beyond it waits, then gets 503")
    body_budget_wait_s: float = Field(1.0, ge=0, description="how long a body waits for that budget")

    # ---- store (timeouts) -------------------------------------------------------------------
    db_connect_timeout_s: float = Field(5.0, gt=0, description="opening a connection (Postgres: 2 s "
                                                               "at least, whole seconds)")
    db_statement_timeout_s: float = Field(
        30.0, ge=0, description="Postgres statement_timeout / SQLite busy timeout, every process; 0: none")
    db_pool_timeout_s: float = Field(5.0, gt=0, description="waiting for a free pooled connection")
    store_timeout_s: float = Field(
        5.0, gt=0, description="serving: a store call of a request (or of the active-version poll) "
                               "that gets no answer within this fails; the request gets 503")
    store_health_timeout_s: float = Field(
        2.0, gt=0, description="GET /health/store and /metrics wait this long for the store")

    # ---- batching / inference -------------------------------------------------------------
    max_batch_size: int = Field(64, ge=1, description="rows merged into one forward pass")
    max_queue_delay_ms: float = Field(2.0, ge=0, description="longest wait for more rows to batch, while "
                                                             "requests keep arriving")
    max_queue_size: int = Field(2048, ge=1, description="pending requests before 503 + Retry-After")
    torch_threads: int = Field(1, ge=1, description="intra-op threads of the serving process")
    inference_thread: Literal["auto", "on", "off"] = Field(
        "auto", description="forward passes on their own thread (on) or on the event loop (off); auto: "
                            "on the loop only when the process has one CPU and a full batch takes < 2 ms")
    device: str = Field("auto", description="auto | cpu | cuda (serving and retraining)")
    version_cache_size: int = Field(2, ge=0, description="non-active versions kept loaded for /versions/{v}")
    explain_max_elements: int = Field(
        1 << 28, ge=1, description="/explain: refuse (413) a request whose rows × inputs × (widest layer + "
                                   "gated units) exceeds this; it bounds one request's work (memory is "
                                   "bounded separately, by explaining in chunks)")

    # ---- model registry / hot-swap --------------------------------------------------------
    poll_interval_s: float = Field(2.0, gt=0, description="how often a replica checks the active version")
    promotion_tolerance: float = Field(0.01, ge=0, description="candidate may trail the champion by this")
    holdout_modulo: int = Field(10, ge=3, description="mix(id) % m == 0: holdout, == 1: validation")
    min_holdout: int = Field(20, ge=1, description="fewer holdout rows than this: the retrain fails")

    # ---- bootstrap (skqk serve on an empty store, skqk init) --------------------------------
    bootstrap_dataset: str = "digits"
    bootstrap_data: Path | None = Field(None, description="CSV/Parquet/NPZ file to bootstrap from instead")
    bootstrap_label_column: str | None = Field(
        None, description="label column(s) of bootstrap_data, comma-separated")
    bootstrap_task: Literal["classification", "regression"] = "classification"
    bootstrap_arch: str = "mlp:256-256"
    bootstrap_epochs: int = Field(30, ge=1)

    # ---- input checks ------------------------------------------------------------------------
    input_range: Literal["off", "warn", "reject"] = Field(
        "warn", description="per-feature ranges of the schema: off | warn (predict: serve and count; "
                            "ingest: refuse) | reject (refuse everywhere)")
    unknown_category: Literal["ignore", "reject"] = Field(
        "ignore", description="a category the version's vocabulary lacks, at predict: ignore (encoded as "
                              "none of the known, counted in skqk_unknown_categories_total) | reject (422)")
    bootstrap_categorical: str | None = Field(None, description="bootstrap from a file: columns a,b read "
                                                                "as categories (like init --categorical)")
    bootstrap_numeric: str | None = Field(None, description="bootstrap from a file: columns read as numbers")
    bootstrap_drop: str | None = Field(None, description="bootstrap from a file: columns left out")

    # ---- retraining ------------------------------------------------------------------------
    retrain_epochs: int = Field(20, ge=1, description="full retrains: at most this many epochs "
                                                      "(qk has none: a feature pass and a readout refit)")
    retrain_qk_readout_iters: int = Field(
        20, ge=1, description="qk retrains: at most this many L-BFGS iterations of the readout refit")
    retrain_refresh_epochs: int = Field(
        2, ge=1, description="mode=refresh: Adam epochs on the drifted layers (then the readout refit)")
    retrain_refresh_max_layers: int = Field(
        0, ge=0, description="mode=refresh: re-learn at most this many drifted layers, the lowest (0: all "
                             "whose firing-rate ratio exceeds 3)")
    retrain_refresh_old_per_new: float = Field(
        1.0, ge=0.0, description="mode=refresh: old rows per new row in the refresh epochs (0: all rows)")
    retrain_drift_min_new: int = Field(
        100, ge=1, description="mode=auto: fewer new samples since the selector was trained are "
                               "too few to judge drift (app/core/drift.py); volume still counts")
    retrain_worker_ttl_s: float = Field(
        30.0, gt=1, description="distributed: a worker counts as online while its heartbeat (every "
                                "ttl/3 s) is younger than this; a stopped worker leaves at once")
    retrain_batch_size: int = Field(128, ge=1)
    retrain_lr: float = Field(1e-3, gt=0)
    retrain_patience: int = Field(5, ge=1)
    retrain_seed: int = 0
    retrain_threads: int = Field(1, ge=1, description="torch threads of an embedded retrain")
    retrain_isolation: Literal["process", "thread"] = Field(
        "process", description="embedded runner: spawn a child process (default) or use a thread")
    retrain_lease_s: float = Field(60.0, gt=1, description="single-flight lease, renewed while training")
    retrain_time_limit_s: int = Field(3600, ge=60, description="Celery hard time limit of one retrain")
    retrain_queue_timeout_s: float = Field(
        600.0, gt=1, description="distributed: a job no worker started within this is dropped")
    retrain_republish_s: float = Field(
        30.0, gt=0, description="distributed: a queued job whose message no worker started within "
                                "this is published again (a worker died holding it)")
    # ---- growing data (issue 13: docs/SCALING.md) ----------------------------------------------
    retrain_memory_mb: int = Field(
        1024, ge=1, description="retrains: memory for sample and feature chunks; the store is read in "
                                 "chunks sized to it, and a full retrain whose data fit it trains in memory")
    feature_cache: bool = Field(True, description="qk retrains keep each sample's penultimate features "
                                                  "per selector version and compute only new ones")
    feature_cache_dir: Path | None = Field(None, description="default {data_dir}/feature-cache; a shared "
                                                             "volume lets sharded workers share it")
    feature_cache_keep: int = Field(3, ge=1, description="feature caches (selector versions) kept on disk")
    retrain_refit_max_rows: int = Field(
        200_000, ge=0, description="qk refit: above this many training rows, use every new one and a "
                                   "fixed, id-hashed, reweighted sample of the old ones, about this many "
                                   "rows in all (cost follows the new data); at or below it, or 0: every "
                                   "row, exact full batch")
    retention: Literal["all", "last_n", "last_days"] = Field(
        "all", description="what a retrain trains and judges on: all samples, the last N, the last T days")
    retention_n: int = Field(1_000_000, ge=1, description="retention=last_n: this many newest samples")
    retention_days: float = Field(90.0, gt=0, description="retention=last_days: samples this young")
    retrain_shards: int = Field(
        0, ge=0, description="distributed qk retrains: split the feature pass into this many Celery "
                             "tasks (group/chord, needs a shared feature_cache_dir); 0: one worker")
    retrain_test_pause_file: Path | None = Field(
        None, description="test knob only: while this file exists, a Celery worker's retrain "
                          "waits after each epoch (tests hold a job mid-training)")

    # ---- derived ---------------------------------------------------------------------------
    @model_validator(mode="after")
    def _values_from_files(self) -> Settings:
        # A value given directly wins; the file fills in only what is unset.
        for value, file, env in (("database_url", "database_url_secret", "SKQK_DATABASE_URL_FILE"),
                                 ("api_key", "api_key_secret", "SKQK_API_KEY_FILE"),
                                 ("ingest_api_key", "ingest_api_key_file", "SKQK_INGEST_API_KEY_FILE"),
                                 ("predict_api_key", "predict_api_key_file", "SKQK_PREDICT_API_KEY_FILE")):
            path = getattr(self, file)
            if not getattr(self, value) and path is not None:
                setattr(self, value, _read_secret(path, env))
                self._from_files[value] = (env, path)
        return self

    def key_source(self) -> str:
        """Where the admin key came from, for the log (never the key itself)."""
        if "api_key" in self._from_files:
            env, path = self._from_files["api_key"]
            return f"{env}={path}"
        return "SKQK_API_KEY" if self.api_key else str(self.api_key_file.resolve())

    def loose_secret_files(self) -> list[str]:
        """Warnings for secret files any user of the machine can read."""
        out = []
        for env, path in self._from_files.values():
            try:
                mode = path.stat().st_mode
            except OSError:
                continue
            if mode & stat.S_IROTH:
                out.append(f"{env}={path} is readable by every user of this machine (mode "
                           f"{stat.S_IMODE(mode):04o}); restrict it: chmod 600 {path}")
        return out

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'skqk.db').resolve()}"

    @property
    def resolved_feature_cache_dir(self) -> Path:
        default = self.data_dir / "feature-cache"
        return self.feature_cache_dir if self.feature_cache_dir is not None else default

    @property
    def api_key_file(self) -> Path:
        return self.data_dir / API_KEY_FILE


def resolve_api_key(settings: Settings) -> str:
    """The admin key: ``SKQK_API_KEY`` or one generated once and kept in ``data_dir`` (0600)."""
    if settings.api_key:
        return settings.api_key
    path = settings.api_key_file
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            key = path.read_text().strip()
            if key:
                return key
            time.sleep(0.05)
        raise RuntimeError(f"API key file {path} is empty; delete it or set SKQK_API_KEY") from None
    key = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    log.warning("generated an admin API key into %s (set SKQK_API_KEY to choose one)", path.resolve())
    return key


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
