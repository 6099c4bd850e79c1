"""`skqk samples list|quarantine|release|delete|audit`: sample administration on the store.

Works directly on the store the other commands use (``SKQK_DATABASE_URL``, else the SQLite
file in ``SKQK_DATA_DIR``), so it needs no running server; actions are audited as
``cli:<user>@<host>``, in the same transaction as the change (see app.storage.sample_admin).
Exit codes: 0 done, 1 store error or delete not confirmed, 2 bad options.
"""

from __future__ import annotations

import getpass
import json
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.table import Table
from rich.text import Text

from app.cli.common import console

if TYPE_CHECKING:
    from app.settings import Settings
    from app.storage import SampleSelection, Store, StoredSample

samples_app = typer.Typer(help="List, quarantine, release or delete stored samples (audited).",
                          no_args_is_help=True)

IDS = typer.Option(None, "--ids", help="comma-separated sample ids, e.g. 1,2,3")
FROM_ID = typer.Option(None, "--from-id", help="first id of a range (inclusive)")
TO_ID = typer.Option(None, "--to-id", help="last id of a range (inclusive)")
INGEST_KEY = typer.Option(None, "--ingest-key", help="the idempotency key the rows were ingested under")
BATCH_ID = typer.Option(None, "--batch-id", help="ingest batch id (GET /samples shows it)")
REASON = typer.Option(None, "--reason", help="why (kept in the audit trail)")


_FIELDS = re.compile(r"\b(ids|from_id|to_id|ingest_key|batch_id|limit)\b")


def _fail(message: str, code: int) -> NoReturn:
    console.print(message, style="red", markup=False, highlight=False)
    raise typer.Exit(code)


def _as_options(message: str) -> str:
    """A store message names fields (``from_id``); here they are options (``--from-id``)."""
    return _FIELDS.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


@contextmanager
def _store() -> Iterator[Store]:
    from sqlalchemy.exc import DBAPIError

    from app.settings import get_settings
    from app.storage import open_store

    store = None
    try:
        store = open_store(get_settings().resolved_database_url)
        yield store
    except DBAPIError as exc:
        _fail(f"store unavailable: {type(exc.orig).__name__}: {exc.orig}", 1)
    finally:
        if store is not None:
            store.dispose()


def _ids(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        _fail(f"--ids: expected comma-separated integers, got {text!r}", 2)


def _selection(ids: str | None, from_id: int | None, to_id: int | None, ingest_key: str | None,
               batch_id: int | None) -> SampleSelection:
    from app.storage import SampleSelection, SelectionError

    try:
        return SampleSelection(_ids(ids), from_id, to_id, ingest_key, batch_id)
    except SelectionError as exc:  # the message names the field: --ids for ids, …
        _fail(_as_options(str(exc)), 2)


def _describe(selection: SampleSelection) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in selection.to_json().items())


def _act(action: str, selection: SampleSelection, reason: str | None) -> None:
    with _store() as store:
        do = {"quarantine": store.quarantine_samples, "release": store.release_samples,
              "delete": store.delete_samples}[action]
        outcome = do(selection, cli_actor(), reason)
        used, held = store.sample_count(), store.quarantined_count()
        console.print(f"{action}: {outcome.affected} samples ({_describe(selection)}); audit "
                      f"#{outcome.audit_id}; retrains now use {used} samples, {held} quarantined",
                      markup=False, highlight=False)


@samples_app.command()
def quarantine(ids: str | None = IDS, from_id: int | None = FROM_ID, to_id: int | None = TO_ID,
               ingest_key: str | None = INGEST_KEY, batch_id: int | None = BATCH_ID,
               reason: str | None = REASON) -> None:
    """Keep the selected samples but leave them out of every retrain (and its holdout)."""
    _act("quarantine", _selection(ids, from_id, to_id, ingest_key, batch_id), reason)


@samples_app.command()
def release(ids: str | None = IDS, from_id: int | None = FROM_ID, to_id: int | None = TO_ID,
            ingest_key: str | None = INGEST_KEY, batch_id: int | None = BATCH_ID,
            reason: str | None = REASON) -> None:
    """Undo a quarantine: the next retrain uses the samples again."""
    _act("release", _selection(ids, from_id, to_id, ingest_key, batch_id), reason)


@samples_app.command()
def delete(ids: str | None = IDS, from_id: int | None = FROM_ID, to_id: int | None = TO_ID,
           ingest_key: str | None = INGEST_KEY, batch_id: int | None = BATCH_ID,
           reason: str = typer.Option(..., "--reason", help="why (required; kept in the audit trail)"),
           yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation")) -> None:
    """Delete the selected samples for good (their ingest key stays taken: a retry stores nothing)."""
    selection = _selection(ids, from_id, to_id, ingest_key, batch_id)
    if not reason.strip():
        _fail("--reason: a delete needs a reason", 2)
    if not yes:
        with _store() as store:
            matched = store.count_selected(selection)
        if not typer.confirm(f"delete {matched} samples ({_describe(selection)}) for good?", default=False,
                             err=True):
            _fail("not deleted", 1)
    _act("delete", selection, reason)


@samples_app.command()
def retain(archive: Path | None = typer.Option(None, "--archive", help="first write the retained-out rows "
                                                 "to this Parquet file (needs the files extra)"),
           delete_rows: bool = typer.Option(False, "--delete", help="then delete them (audited)"),
           reason: str | None = REASON,
           yes: bool = typer.Option(False, "--yes", "-y", help="do not ask before deleting")) -> None:
    """Archive and/or delete the samples outside the retention window (SKQK_RETENTION).

    The window is what retrains use (the last SKQK_RETENTION_N samples of the active version's
    schema, or those of the last SKQK_RETENTION_DAYS); every stored row at or below its lowest
    id is retained out. Ids never change, so the rows left keep their train/holdout roles.
    """
    from app.settings import get_settings
    from app.storage import SampleSelection

    settings = get_settings()
    if settings.retention == "all":
        console.print("SKQK_RETENTION=all: every sample is in the window; nothing to do", highlight=False)
        return
    if archive is None and not delete_rows:
        _fail("give --archive FILE, --delete, or both", 2)
    with _store() as store:
        floor = _retention_floor(store, settings)
        selection = SampleSelection(to_id=floor) if floor > 0 else None
        matched = store.count_selected(selection) if selection is not None else 0
        what = f"{matched} samples with id ≤ {floor} (retention {settings.retention})"
        if matched == 0 or selection is None:
            console.print(f"nothing outside the window ({what})", highlight=False)
            return
        if archive is not None:
            from app.storage.archive import archive_samples

            written = archive_samples(store, floor, archive)
            console.print(f"archived {written} samples with id ≤ {floor} to {archive}", highlight=False)
        if not delete_rows:
            return
        if not yes and not typer.confirm(f"delete {what} for good?", default=False, err=True):
            _fail("not deleted", 1)
        why = reason or f"retention {settings.retention}: outside the window (id ≤ {floor})"
        if archive is not None:
            why += f"; archived to {archive.name}"
        outcome = store.delete_samples(selection, cli_actor(), why)
        console.print(f"delete: {outcome.affected} samples (id ≤ {floor}); audit #{outcome.audit_id}; "
                      f"retrains now use {store.sample_count()} samples", markup=False, highlight=False)


def _retention_floor(store: Store, settings: Settings) -> int:
    from app.core.spec import ArchSpec
    from app.retrain.sample_stream import retention_floor
    from app.serving.version_schema import schema_of

    active = store.active_version()
    record = store.get_version(active, weights=False) if active is not None else None
    if record is None:
        _fail("no active model version: the window follows its feature schema", 1)
    spec = ArchSpec.from_dict(record.architecture)
    n_targets = spec.num_outputs if schema_of(record, spec).is_regression else None
    return retention_floor(store, settings, spec.input_dim, store.max_sample_id(), n_targets)


def _label(row: StoredSample) -> str:
    if row.label is not None:
        return str(row.label)
    return "[" + ", ".join(f"{t:.6g}" for t in row.targets or []) + "]"


@samples_app.command("list")
def list_(from_id: int | None = FROM_ID, to_id: int | None = TO_ID, ingest_key: str | None = INGEST_KEY,
          batch_id: int | None = BATCH_ID,
          quarantined: bool | None = typer.Option(None, "--quarantined/--not-quarantined",
                                                  help="only quarantined / only used rows (default: both)"),
          after_id: int | None = typer.Option(None, "--after-id", min=0, help="continue after this id"),
          limit: int = typer.Option(50, "--limit", min=1, max=1000),
          features: bool = typer.Option(False, "--features", help="include the feature values"),
          as_json: bool = typer.Option(False, "--json", help="one JSON object instead of a table")) -> None:
    """One page of samples in id order (filters combine)."""
    from app.storage import SelectionError
    from app.storage.sample_admin import check_ingest_key

    try:
        if ingest_key is not None:
            check_ingest_key("ingest_key", ingest_key)
        with _store() as store:
            page = store.list_samples(from_id=from_id, to_id=to_id, batch_id=batch_id, ingest_key=ingest_key,
                                      quarantined=quarantined, after_id=after_id, limit=limit,
                                      features=features)
            used, held = store.sample_count(), store.quarantined_count()
    except SelectionError as exc:
        _fail(_as_options(str(exc)), 2)
    if as_json:
        print(json.dumps({"samples": [r.to_dict() for r in page.rows], "next_after_id": page.next_after_id}))
        return
    table = Table("id", "batch", "ingest key", "created", "label", "quarantined", title="samples")
    if features:
        table.add_column("features")
    for r in page.rows:
        held_note = (f"{r.quarantined_at:%Y-%m-%d %H:%M} #{r.quarantine_audit_id} {r.quarantine_reason or ''}"
                     if r.quarantined_at else "")
        created = f"{r.created_at:%Y-%m-%d %H:%M:%S}" if r.created_at else ""
        # Text(): keys and reasons are user input, never rich markup
        cells: list[Any] = [str(r.id), str(r.batch_id), Text(r.ingest_key or ""), created, _label(r),
                            Text(held_note)]
        if features:
            cells.append(", ".join(f"{v:.4g}" for v in r.features or []))
        table.add_row(*cells)
    console.print(table)
    more = f"; next page: --after-id {page.next_after_id}" if page.next_after_id is not None else ""
    console.print(f"{len(page.rows)} rows{more}. Store: {used} samples used by retrains, {held} quarantined",
                  highlight=False)


@samples_app.command()
def audit(limit: int = typer.Option(20, "--limit", min=1, max=1000),
          before_id: int | None = typer.Option(None, "--before-id", min=1, help="older than this entry"),
          as_json: bool = typer.Option(False, "--json", help="one JSON object instead of a table")) -> None:
    """The quarantine / release / delete trail, newest first."""
    with _store() as store:
        trail = store.sample_audit(limit, before_id)
    if as_json:
        print(json.dumps({"entries": [e.to_dict() for e in trail.entries],
                          "next_before_id": trail.next_before_id}))
        return
    table = Table("#", "at (UTC)", "actor", "action", "selector", "affected", "reason", title="sample audit")
    for e in trail.entries:
        table.add_row(str(e.id), f"{e.at:%Y-%m-%d %H:%M:%S}", Text(e.actor), e.action,
                      Text(json.dumps(e.selector)[:80]), str(e.affected), Text(e.reason or ""))
    console.print(table)
    if trail.next_before_id is not None:
        console.print(f"older entries: --before-id {trail.next_before_id}", highlight=False)
