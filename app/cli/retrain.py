"""`skqk retrain`: one retrain here or on a running service, with exit codes for cron."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

from app.cli.common import console, fail, open_configured_store, safe_url, say

if TYPE_CHECKING:
    from app.settings import Settings
    from app.storage import Store


# `skqk retrain` exit codes, for cron and CI (docs/OPERATIONS.md)
EXIT_PROMOTED, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED, EXIT_NOTHING_NEW = 0, 1, 2, 3, 4


def retrain(mode: str = typer.Option("auto", help="auto (the drift rule picks qk, refresh or full) | qk "
                                                  "(estimator only, structure frozen) | refresh (drifted "
                                                  "layers, then QK) | full"),
            force: bool = typer.Option(False, "--force", help="retrain even when no sample lies beyond the "
                                                              "active version's data watermark"),
            epochs: int | None = typer.Option(None, min=1, help="in-process: override SKQK_RETRAIN_EPOCHS "
                                                                "(full retrains)"),
            tolerance: float | None = typer.Option(None, min=0.0,
                                                   help="in-process: override SKQK_PROMOTION_TOLERANCE"),
            url: str | None = typer.Option(None, "--url", help="submit to a running service (e.g. "
                                           "http://skqk:8000) instead of running here"),
            api_key: str | None = typer.Option(None, "--api-key", help="--url: the admin key (default "
                                               "SKQK_API_KEY / SKQK_API_KEY_FILE)"),
            wait: bool = typer.Option(True, "--wait/--no-wait", help="--url: poll the job until it ends "
                                      "(default); --no-wait exits 0 once queued"),
            timeout: float = typer.Option(7200.0, min=1.0, help="--url --wait: give up (exit 1) after "
                                          "this many seconds"),
            poll: float = typer.Option(2.0, min=0.1, help="--url --wait: seconds between status reads")
            ) -> None:
    """One retrain; exits 0 promoted, 3 not promoted (the gate), 4 nothing new to train on, 1 failed.

    Without --url it runs here, in this process (same job as POST /retrain: the same
    single-flight lease, and the Redis lock in distributed mode; running servers pick up a
    promotion on their next poll, or at once over Redis). With --url it asks that service to run
    it (its runner: embedded, or a Celery worker) and, with --wait, polls until it ends.
    Nothing new since the active version's data watermark: nothing is done (exit 4) unless --force.
    """
    from app.retrain.job import REQUEST_MODES

    if mode not in REQUEST_MODES:
        fail(f"--mode must be one of {list(REQUEST_MODES)}", EXIT_USAGE)
    if url is not None:
        if epochs is not None or tolerance is not None:
            fail("--epochs and --tolerance apply to an in-process retrain; a service uses its own "
                  "SKQK_* settings", EXIT_USAGE)
        raise typer.Exit(_retrain_remote(url, api_key, mode, force, wait, timeout, poll))
    raise typer.Exit(_retrain_here(mode, force, epochs, tolerance))


def _retrain_here(mode: str, force: bool, epochs: int | None, tolerance: float | None) -> int:
    from app.retrain.embedded_runner import acquire_retrain_lease
    from app.retrain.plan import plan_retrain
    from app.retrain.protocol import RETRAIN_LEASE, new_job_id

    settings, store = open_configured_store()
    overrides = (("retrain_epochs", epochs), ("promotion_tolerance", tolerance))
    settings = settings.model_copy(update={k: v for k, v in overrides if v is not None})
    if not force:
        plan = plan_retrain(store)
        if plan.nothing_new:
            store.dispose()
            return _print_outcome(plan.skipped())
    job_id = new_job_id()
    if not acquire_retrain_lease(store, job_id, settings.retrain_lease_s):
        say(f"[red]retrain job {store.lease_holder(RETRAIN_LEASE)} is already running")
        store.dispose()
        return EXIT_FAILED
    with contextlib.ExitStack() as stack:
        fence = None
        if settings.redis_url:  # distributed: the workers' single-flight lock applies here too
            from app.distributed import LockHeartbeat, RetrainLock, redis_client

            lock = RetrainLock(redis_client(settings.redis_url), settings.retrain_lease_s)
            if not lock.acquire(job_id):
                store.release_lease(RETRAIN_LEASE, job_id)
                say(f"[red]retrain job {lock.holder()} is already running")
                store.dispose()
                return EXIT_FAILED
            stack.callback(lock.release)
            stack.enter_context(LockHeartbeat(lock, settings.retrain_lease_s))
            fence = lock.owned
        result = _run_cli_retrain(store, settings, job_id, mode, fence)
    if result is None:
        return EXIT_FAILED
    if result["promoted"] and settings.redis_url:
        from app.distributed import publish_activated, redis_client

        publish_activated(redis_client(settings.redis_url), int(result["candidate_version"]))
    return _print_outcome({"status": "succeeded", "job_id": job_id, "result": result})


def _run_cli_retrain(store: Store, settings: Settings, job_id: str, mode: str,
                     fence: Callable[[], bool] | None) -> dict | None:
    """The job's result, or None when it failed or was cancelled (the message is printed)."""
    from app.retrain.job import run_retrain_job
    from app.retrain.protocol import RETRAIN_LEASE

    try:
        store.create_job(job_id, mode, runner="cli")
        last: dict = {}

        def on_progress(p: dict) -> None:
            store.renew_lease(RETRAIN_LEASE, job_id, settings.retrain_lease_s)
            for line in progress_lines(p, last):
                say(line)

        say(f"retrain job {job_id} ({mode}) on {safe_url(store.url)}")
        try:
            return run_retrain_job(store, settings, job_id, mode, on_progress=on_progress, fence=fence,
                                   actor="cli")
        except Exception as exc:
            say(f"[red]retrain failed: {exc}")
            return None
    finally:
        store.release_lease(RETRAIN_LEASE, job_id)
        store.dispose()


def progress_lines(p: dict, last: dict) -> list[str]:
    """Lines for what changed in a job's progress since ``last`` (then updated to ``p``)."""
    lines = []
    phase = p.get("phase")
    if p.get("mode") and p.get("mode") != last.get("mode"):
        lines.append(f"mode {p['mode']}: {p.get('mode_reason', '')}")
    if phase == "features" and (phase != last.get("phase") or p.get("rows_done") != last.get("rows_done")):
        lines.append(f"features: {p.get('rows_done', 0)}/{p.get('rows_total', '?')} rows")
    nan = float("nan")
    if p.get("refit_iterations") is not None and p.get("refit_iterations") != last.get("refit_iterations"):
        lines.append(f"readout refit: {p['refit_iterations']}/{p.get('refit_max_iterations')} iterations "
                     f"(best {p.get('refit_best_iteration')}), val_loss={p.get('val_loss', nan):.4f} "
                     f"{_score(p)}")
    if p.get("epoch") and (p.get("epoch"), phase) != (last.get("epoch"), last.get("phase")):
        lines.append(f"epoch {p['epoch']}/{p.get('epochs')}: train_loss={p.get('train_loss', nan):.4f} "
                     f"val_loss={p.get('val_loss', nan):.4f} {_score(p)}")
    last.clear()
    last.update(p)
    return lines



def _score(p: dict) -> str:
    if p.get("val_acc") is not None and p.get("val_acc") == p.get("val_acc"):  # not NaN
        return f"val_acc={p['val_acc']:.4f}"
    return f"val_rmse={p['val_rmse']:.4g}" if p.get("val_rmse") is not None else ""


def _print_outcome(job: dict) -> int:
    """Print what happened and return the exit code (0 promoted, 3 not, 4 nothing new, 1 failed)."""
    status = job.get("status")
    if status == "skipped":
        say(f"[yellow]nothing to do[/]: {job.get('reason')}")
        console.print_json(json.dumps(job))
        return EXIT_NOTHING_NEW
    if status != "succeeded":
        say(f"[red]retrain {job.get('job_id')} {status}[/]: {job.get('error')}")
        return EXIT_FAILED
    result = job.get("result") or {}
    verdict = "[green]promoted" if result.get("promoted") else "[yellow]not promoted"
    say(f"{verdict}[/]: version {result.get('candidate_version')} ({result.get('mode')}) — "
         f"{result.get('reason')}")
    console.print_json(json.dumps(result))
    return EXIT_PROMOTED if result.get("promoted") else EXIT_REJECTED


def _admin_key(api_key: str | None) -> str:
    if api_key:
        return api_key
    from app.settings import get_settings

    settings = get_settings()
    if settings.api_key:
        return settings.api_key
    if settings.api_key_file.is_file():  # the key `skqk serve` generated on this host
        return settings.api_key_file.read_text().strip()
    fail("--url needs the admin key: --api-key, SKQK_API_KEY or SKQK_API_KEY_FILE", EXIT_USAGE)
    raise AssertionError  # unreachable: _fail exits


def _retrain_remote(url: str, api_key: str | None, mode: str, force: bool, wait: bool, timeout: float,
                    poll: float) -> int:
    """POST /retrain to a service, then (with ``wait``) poll GET /retrain/{id} until it ends."""
    import httpx

    key = _admin_key(api_key)
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url.rstrip("/"), timeout=30.0) as client:
        try:
            r = client.post("/retrain", json={"mode": mode, "force": force}, headers={"X-API-Key": key})
        except httpx.HTTPError as exc:
            say(f"[red]{url}: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        body = _json_or_text(r)
        if r.status_code == 200 and body.get("status") == "skipped":
            return _print_outcome(body)
        if r.status_code != 202:
            say(f"[red]POST /retrain: {r.status_code} {body.get('error', body)}")
            return EXIT_FAILED
        job_id = body["job_id"]
        say(f"retrain job {job_id} ({mode}) queued on {url}")
        if not wait:
            return EXIT_PROMOTED
        last: dict = {}
        while time.monotonic() < deadline:
            try:
                r = client.get(f"/retrain/{job_id}")
            except httpx.HTTPError as exc:  # a replica restarting, a blip: the job goes on
                say(f"[yellow]status read failed ({type(exc).__name__}); retrying")
                time.sleep(poll)
                continue
            job = _json_or_text(r)
            if r.status_code == 200:
                for line in progress_lines(job.get("progress") or {}, last):
                    say(line)
                if job.get("status") in ("succeeded", "failed", "cancelled"):
                    return _print_outcome(job)
            elif r.status_code == 404:
                say(f"[red]job {job_id} vanished: {job.get('error')}")
                return EXIT_FAILED
            time.sleep(poll)
    say(f"[red]job {job_id} did not end within {timeout:g}s (--timeout); it may still run")
    return EXIT_FAILED


def _json_or_text(r: object) -> dict:
    try:
        value = r.json()  # type: ignore[attr-defined]
    except ValueError:
        return {"error": getattr(r, "text", "")[:500]}
    return value if isinstance(value, dict) else {"error": str(value)[:500]}
