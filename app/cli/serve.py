"""`skqk serve` (the HTTP API) and `skqk worker` (a Celery retrain worker)."""

from __future__ import annotations

from pathlib import Path

import typer

from app.cli.common import console, fail, open_configured_store, safe_url


def serve(host: str | None = typer.Option(None, help="bind address (SKQK_HOST, default 127.0.0.1)"),
          port: int | None = typer.Option(None, help="port (SKQK_PORT, default 8000)"),
          workers: int | None = typer.Option(None, min=1, help="uvicorn worker processes (SKQK_WORKERS)"),
          data_dir: Path | None = typer.Option(None, help="SKQK_DATA_DIR"),
          log_level: str | None = typer.Option(None, help="SKQK_LOG_LEVEL")) -> None:
    """Serve the HTTP API; bootstraps version 1 (SKQK_BOOTSTRAP_DATASET, digits) on an empty store."""
    import logging
    import os

    import uvicorn

    from app.api.http_protocol import protocol_path
    from app.intake.bootstrap import ensure_bootstrapped
    from app.serving.multiproc_metrics import prepare_workers
    from app.settings import get_settings, resolve_api_key

    for name, value in (("HOST", host), ("PORT", port), ("WORKERS", workers), ("DATA_DIR", data_dir),
                        ("LOG_LEVEL", log_level)):
        if value is not None:  # via the environment, so every worker process sees them
            os.environ[f"SKQK_{name}"] = str(value)
    get_settings.cache_clear()
    settings, store = open_configured_store()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key_source = settings.key_source()
    for warning in settings.loose_secret_files():
        logging.getLogger("skqk.settings").warning(warning)
    resolve_api_key(settings)
    try:
        active = ensure_bootstrapped(store, settings)  # logs what it stores, each epoch, the score
    except ValueError as exc:  # SKQK_BOOTSTRAP_DATA unusable (DataFileError, SchemaError, BootstrapError)
        store.dispose()
        fail(f"cannot bootstrap version 1: {exc}", 2)
    console.print(f"store {safe_url(store.url)}: active version {active}; admin key from {key_source}")
    store.dispose()
    # several workers: one /metrics scrape covers them all (app/serving/multiproc_metrics.py)
    own_metrics_dir = prepare_workers(settings.workers)
    try:
        uvicorn.run("app.api.main:create_app", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=settings.log_level.lower(),
                    access_log=settings.access_log, timeout_graceful_shutdown=5,
                    http=protocol_path())  # uvicorn's protocol + SKQK_HEADER_TIMEOUT_S
    finally:
        if own_metrics_dir:
            import shutil

            shutil.rmtree(own_metrics_dir, ignore_errors=True)


def worker(queues: str = typer.Option("gpu", help="Celery queues to consume"),
           concurrency: int = typer.Option(1, min=1, help="pool processes; one per GPU"),
           loglevel: str = typer.Option("info")) -> None:
    """Run a Celery retrain worker (distributed mode: needs SKQK_REDIS_URL).

    Prefork pool, one task per child process: the parent never initialises CUDA, and each
    retrain runs in a fresh child with its own CUDA context.
    """
    from app.settings import get_settings

    if not get_settings().redis_url:
        console.print("[red]skqk worker needs SKQK_REDIS_URL (the Celery broker)")
        raise typer.Exit(2)
    from workers.celery_app import celery_app

    celery_app.worker_main(["worker", "--queues", queues, "--concurrency", str(concurrency),
                            "--pool", "prefork", "--prefetch-multiplier", "1",
                            "--max-tasks-per-child", "1", "--loglevel", loglevel,
                            "--without-gossip", "--without-mingle"])
