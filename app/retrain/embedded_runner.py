"""The embedded retrain runner (default, ``SKQK_REDIS_URL`` unset).

:class:`EmbeddedRunner` runs :func:`app.retrain.job.run_retrain_job` in a child process (or a
thread) of the server, so requests keep being served. Single-flight through the ``retrain``
lease in the SQL store, which also holds across ``--workers`` processes and ``skqk retrain``.
Cancelling a queued job takes effect at once and frees the lock; a running one stops between
epochs and ends ``cancelled``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading

from app.core.training import TrainingCancelled
from app.retrain.job import JobInterrupted, JobNotQueued, run_retrain_job
from app.retrain.protocol import (
    RETRAIN_LEASE,
    FinishedHook,
    RetrainInProgress,
    RetrainQueueUnavailable,
    check_mode,
    new_job_id,
)
from app.settings import Settings
from app.storage import JobRecord, Store

log = logging.getLogger("skqk.runner")

def acquire_retrain_lease(store: Store, job_id: str, ttl_s: float) -> bool:
    """Single-flight: take the ``retrain`` lease for ``job_id``.

    A holder whose job row is already finished (its supervisor is just cleaning up) does
    not block: the lease is taken over by compare-and-set on that holder.
    """
    for _ in range(3):
        if store.try_acquire_lease(RETRAIN_LEASE, job_id, ttl_s):
            return True
        holder = store.lease_holder(RETRAIN_LEASE)
        if holder is None:
            continue  # expired or released meanwhile
        job = store.get_job(holder)
        if job is None or not job.finished:
            return False
        if store.take_over_lease(RETRAIN_LEASE, holder, job_id, ttl_s):
            return True
    return False


def _child_main(settings_json: str, job_id: str, mode: str, parent_pid: int) -> None:
    """Entry point of the spawned retrain process."""
    import torch

    from app.settings import Settings as _Settings

    settings = _Settings.model_validate_json(settings_json)
    torch.set_num_threads(settings.retrain_threads)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    store = Store(settings.resolved_database_url)

    def should_cancel() -> bool:  # stop between epochs if the server that started us dies
        if os.getppid() != parent_pid:
            raise JobInterrupted("the server that started this retrain went away")
        return False  # (a cancel request in the job row is read by run_retrain_job)

    try:
        run_retrain_job(store, settings, job_id, mode, should_cancel=should_cancel)
    except (JobNotQueued, TrainingCancelled, JobInterrupted):
        pass  # cancelled before it started, or recorded in the job row (and logged)
    finally:
        store.dispose()


class EmbeddedRunner:
    """Runs one retrain at a time inside this server's host, beside request handling."""

    name = "embedded"

    def __init__(self, store: Store, settings: Settings, on_finished: FinishedHook | None = None,
                 isolation: str | None = None) -> None:
        self.store = store
        self.settings = settings
        self.on_finished = on_finished
        self.isolation = isolation or settings.retrain_isolation
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._processes: dict[str, multiprocessing.process.BaseProcess] = {}
        self._lock = threading.Lock()
        with contextlib.suppress(Exception):
            for job_id in store.fail_orphaned_jobs(RETRAIN_LEASE):
                log.warning("marked orphaned retrain job %s failed", job_id)

    def submit(self, mode: str) -> str:
        check_mode(mode)
        if self._closing.is_set():
            raise RetrainQueueUnavailable("server is shutting down")
        job_id = new_job_id()
        if not acquire_retrain_lease(self.store, job_id, self.settings.retrain_lease_s):
            raise RetrainInProgress(self.store.lease_holder(RETRAIN_LEASE))
        try:
            self.store.create_job(job_id, mode, runner=f"{self.name}:{self.isolation}")
            thread = threading.Thread(target=self._supervise, args=(job_id, mode),
                                      name=f"skqk-retrain-{job_id[:8]}", daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()
        except Exception:
            self.store.release_lease(RETRAIN_LEASE, job_id)
            raise
        return job_id

    def status(self, job_id: str) -> JobRecord | None:
        return self.store.get_job(job_id)

    def workers_online(self) -> int | None:
        return None  # the job runs beside this server: there is no queue to wait in

    # ---- supervision ------------------------------------------------------------------------
    def _heartbeat(self, job_id: str, done: threading.Event) -> None:
        interval = max(self.settings.retrain_lease_s / 4, 0.5)
        while not done.wait(interval):
            try:
                if not self.store.renew_lease(RETRAIN_LEASE, job_id, self.settings.retrain_lease_s):
                    log.info("retrain job %s no longer holds the lease", job_id)
            except Exception:
                log.warning("could not renew the retrain lease", exc_info=True)

    def _supervise(self, job_id: str, mode: str) -> None:
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job_id, done), daemon=True)
        beat.start()
        try:
            if self.isolation == "process":
                self._run_process(job_id, mode)
            else:
                import torch

                torch.set_num_threads(self.settings.retrain_threads)  # per OS thread for OpenMP

                def should_cancel() -> bool:  # a cancel request in the job row is read anyway
                    if self._closing.is_set():
                        raise JobInterrupted("the server is shutting down")
                    return False

                with contextlib.suppress(Exception):  # recorded in the job row by run_retrain_job
                    run_retrain_job(self.store, self.settings, job_id, mode, should_cancel=should_cancel)
        except Exception as exc:
            log.exception("retrain supervisor failed")
            self._fail_if_unfinished(job_id, f"{type(exc).__name__}: {exc}")
        finally:
            done.set()
            with contextlib.suppress(Exception):
                self.store.release_lease(RETRAIN_LEASE, job_id)
            self._finished(job_id)

    def _run_process(self, job_id: str, mode: str) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch state
        process = ctx.Process(target=_child_main, name=f"skqk-retrain-{job_id[:8]}", daemon=True,
                              args=(self.settings.model_dump_json(), job_id, mode, os.getpid()))
        with self._lock:
            self._processes[job_id] = process
        process.start()
        process.join()
        with self._lock:
            self._processes.pop(job_id, None)
        if process.exitcode != 0:
            self._fail_if_unfinished(job_id, f"retrain process exited with code {process.exitcode}")

    def _fail_if_unfinished(self, job_id: str, error: str) -> None:
        self.store.fail_job_if_unfinished(job_id, error)

    def _finished(self, job_id: str) -> None:
        job = self.store.get_job(job_id)
        if job is None:
            return
        # (the retrain gauges of /metrics read the job table: nothing to count here)
        if self.on_finished is not None:
            try:
                self.on_finished(job)
            except Exception:
                log.exception("on_finished hook failed for job %s", job_id)

    def cancel(self, job_id: str) -> str | None:
        if self.store.cancel_queued_job(job_id):  # its run has not started: it never will
            self.store.release_lease(RETRAIN_LEASE, job_id)
            return "cancelled"
        job = self.store.get_job(job_id)
        if job is None or job.finished:  # (its child process may still be on its way out)
            return None
        with self._lock:
            process = self._processes.get(job_id)
        if process is None or process.pid is None:
            # a thread, or a job of another server process (--workers): it reads the request
            # between epochs and ends cancelled
            return "cancelling" if self.store.request_cancel(job_id) else None
        process.terminate()  # a child process holds no state worth a graceful stop
        if self.store.finish_job(job_id, "cancelled", error="cancelled by request (process stopped)"):
            self.store.release_lease(RETRAIN_LEASE, job_id)
            return "cancelled"
        return None  # it finished just before

    def close(self, timeout: float = 10.0) -> None:
        self._closing.set()
        with self._lock:
            processes = list(self._processes.values())
            threads = list(self._threads)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for thread in threads:
            thread.join(timeout)
