"""Prometheus metrics of one serving process (own registry, so several apps can coexist).

Two kinds: the process's own (requests, batches, ingests, the served version), and the
replica's (``ScrapeGauge``: store and job-table figures the scraping process reads just
before rendering). With ``skqk serve --workers N`` the CLI sets ``PROMETHEUS_MULTIPROC_DIR``
before uvicorn starts the workers: the process's own metrics then live in per-process files
that every scrape sums (app/serving/multiproc_metrics.py), so any worker answers for the
whole replica and counters never jump between workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from app.serving.loop_metrics import LoopGauge, LoopHistogram, SharedLoopGauge
from app.serving.multiproc_metrics import ProcessFiles, forget_dead_processes, multiproc_dir, replica_registry
from app.serving.scrape_gauges import ScrapeGauge

if TYPE_CHECKING:
    from app.storage.job_stats import RetrainStats

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DRIFT_SIGNALS = ("nn_ratio", "far_fraction", "rate_ratio", "volume_ratio")


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiproc_path: str | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)  # this process's own metrics
        s = self.scrape_registry = CollectorRegistry(auto_describe=True)  # the replica's, set at scrape
        self.multiproc_path = multiproc_path or multiproc_dir()
        files = ProcessFiles(self.multiproc_path) if self.multiproc_path else None
        # observed on the event loop for every request: lock-free (app/serving/loop_metrics.py)
        self.request_latency = LoopHistogram(
            "skqk_request_latency_seconds", "HTTP request latency by route", ["method", "route", "status"],
            buckets=LATENCY_BUCKETS, registry=r, shared=files and files.histograms)
        in_flight_doc = "HTTP requests being handled"
        self.in_flight: LoopGauge | SharedLoopGauge = (
            LoopGauge("skqk_requests_in_flight", in_flight_doc, registry=r) if files is None
            else SharedLoopGauge("skqk_requests_in_flight", in_flight_doc, files.live_gauges))
        self.body_bytes_in_flight = Gauge(
            "skqk_request_body_bytes_in_flight", "bytes of large request bodies (over 64 KiB) being read "
            "or handled (SKQK_MAX_INFLIGHT_BODY_BYTES bounds it)", registry=r, multiprocess_mode="livesum")
        self.store_up = ScrapeGauge("skqk_store_up", "1 when the SQL store answered the last probe or "
                                    "/metrics read in time (SKQK_STORE_HEALTH_TIMEOUT_S), else 0", registry=s)
        self.queue_time = LoopHistogram("skqk_batch_queue_seconds", "time a request waited for its batch",
                                        (), buckets=QUEUE_BUCKETS, registry=r,
                                        shared=files and files.histograms)
        self.batch_size = Histogram("skqk_batch_size_rows", "rows per forward pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("skqk_batch_size_requests", "requests merged per forward pass",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.inference_time = Histogram("skqk_inference_seconds", "forward pass time per batch",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("skqk_batch_queue_depth", "requests waiting for a batch", registry=r,
                                 multiprocess_mode="livesum")
        self.queue_rejections = Counter("skqk_queue_rejections", "requests refused with 503 (queue full)",
                                        registry=r)
        self.model_version = Gauge("skqk_model_version", "model version this process serves (several "
                                   "workers: the lowest any live one serves)", registry=r,
                                   multiprocess_mode="livemin")
        self.model_swaps = Counter("skqk_model_swaps", "hot-swaps to another version", registry=r)
        self.model_load_failures = Counter("skqk_model_load_failures",
                                           "versions that failed to load (old model kept)", registry=r)
        self.ingest_requests = Counter("skqk_ingest_requests", "ingest requests by outcome", ["outcome"],
                                       registry=r)
        # named for what it counts: `skqk ingest` files and other replicas never pass through it;
        # skqk_samples_total (read from the store) counts every stored sample, however it came
        self.ingest_samples = Counter(
            "skqk_http_ingest_samples", "samples committed by POST /ingest on this replica (not `skqk "
            "ingest` file imports: skqk_samples_total counts every sample in the store)", registry=r)
        self.samples_total = ScrapeGauge(
            "skqk_samples_total", "samples in the store (read when /metrics is scraped; the last value "
            "is kept while the store is down)", registry=s)
        self.input_out_of_range = Counter(
            "skqk_input_out_of_range_rows", "rows with a feature outside the schema's range "
            "(SKQK_INPUT_RANGE warn|reject), served or refused", ["endpoint"], registry=r)
        self.unknown_categories = Counter(
            "skqk_unknown_categories", "values of a categorical feature outside the version's vocabulary "
            "(SKQK_UNKNOWN_CATEGORY: served as none of the known, or refused)", ["endpoint", "feature"],
            registry=r)
        self.model_holdout = Gauge(
            "skqk_model_holdout", "holdout metrics of the served version (classification: acc, loss; "
            "regression: rmse, mae, r2, loss)", ["metric"], registry=r, multiprocess_mode="livemostrecent")
        # retrain gauges: read from the SQL job table when /metrics is scraped, so every
        # replica exports the same numbers whoever ran the job (app/storage/job_stats.py)
        self.retrain_jobs = ScrapeGauge(
            "skqk_retrain_jobs_total", "retrain jobs in the job table by mode (the one that ran; auto "
            "while not chosen yet) and outcome (queued|running|promoted|rejected|failed|cancelled); "
            "only grows, like a counter", ["mode", "outcome"], registry=s)
        self.retrain_last_success = ScrapeGauge(
            "skqk_retrain_last_success_timestamp_seconds", "when the latest retrain job that ran to the "
            "end (promoted or rejected by the gate) finished, Unix time; 0: none yet", registry=s)
        self.retrain_last_failure = ScrapeGauge(
            "skqk_retrain_last_failure_timestamp_seconds", "when the latest failed retrain job ended, Unix "
            "time; 0: none yet", registry=s)
        self.retrain_last_duration = ScrapeGauge(
            "skqk_retrain_last_duration_seconds", "running time (start to end) of the latest finished "
            "retrain job that started", registry=s)
        self.retrain_last_queue_wait = ScrapeGauge(
            "skqk_retrain_last_queue_wait_seconds", "how long the latest retrain job waited for a runner "
            "(still queued: so far)", registry=s)
        self.retrain_new_samples = ScrapeGauge(
            "skqk_retrain_new_samples", "samples beyond the active version's data watermark (what the next "
            "retrain would add; 0: POST /retrain is skipped); counted up to 100000", registry=s)
        self.structural_drift = ScrapeGauge(
            "skqk_structural_drift", "drift of new samples' gate patterns, from the latest finished "
            "retrain (ratios ≈ 1 and far_fraction ≈ 0.05: same distribution)", ["signal"], registry=s)
        self.drift_recommend_full = ScrapeGauge(
            "skqk_drift_recommend_full", "1 when the latest retrain's drift report says: use mode=full; "
            "basis: signals (the distribution signals were judged) or volume (too few new samples to "
            "judge them: only volume_ratio, an exact count, can recommend full)", ["basis"], registry=s)
        self.drift_judged = ScrapeGauge(
            "skqk_drift_judged", "0 when the latest retrain had too few new samples to judge the "
            "distribution signals (SKQK_RETRAIN_DRIFT_MIN_NEW; they are then noise and only "
            "volume_ratio counts)", registry=s)

    def set_drift(self, drift: dict[str, Any] | None) -> None:
        if not drift:
            return
        for signal in DRIFT_SIGNALS:
            self.structural_drift.labels(signal).set(float(drift[signal]))
        judged = drift.get("judged") is not False
        basis = "signals" if judged else "volume"  # says why a 1 can sit beside skqk_drift_judged 0
        self.drift_recommend_full.replace({(basis,): 1.0 if drift["recommend_full"] else 0.0})
        self.drift_judged.set(1.0 if judged else 0.0)

    def set_retrain_stats(self, stats: RetrainStats) -> None:
        """The retrain gauges from one read of the job table (every replica reads the same)."""
        # a (mode, outcome) pair that has gone (queued → running) goes too
        self.retrain_jobs.replace({(mode, outcome): float(n) for (mode, outcome), n in stats.jobs.items()})
        self.retrain_last_success.set(stats.last_success_ts or 0.0)
        self.retrain_last_failure.set(stats.last_failure_ts or 0.0)
        if stats.last_duration_s is not None:
            self.retrain_last_duration.set(stats.last_duration_s)
        if stats.last_queue_wait_s is not None:
            self.retrain_last_queue_wait.set(stats.last_queue_wait_s)

    def set_model_metrics(self, metrics: dict[str, Any]) -> None:
        """Export the served version's ``holdout_*`` numbers (only the task's own metrics)."""
        self.model_holdout.clear()
        for key, value in metrics.items():
            if key.startswith("holdout_") and isinstance(value, (int, float)) and value is not None:
                self.model_holdout.labels(key[len("holdout_"):]).set(float(value))

    def render(self) -> bytes:
        """The exposition: this process's metrics (every worker's, in multiprocess mode), then the
        replica's (the caller set them from the store just before)."""
        if self.multiproc_path is None:
            own = generate_latest(self.registry)
        else:
            forget_dead_processes(self.multiproc_path)
            own = generate_latest(replica_registry(self.multiproc_path))
        return own + generate_latest(self.scrape_registry)
