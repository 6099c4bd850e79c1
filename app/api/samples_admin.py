"""Sample administration over HTTP (admin ``X-API-Key``): list, quarantine, release, delete, audit.

- ``GET /samples`` → a page of samples in id order (filters AND-ed) + ``next_after_id``;
- ``POST /samples/quarantine|release|delete`` with exactly one selector (``ids``,
  ``from_id``/``to_id``, ``ingest_key``, ``batch_id``) → ``{"action", "affected", "audit_id"}``;
  ``reason`` is required for delete. A selector that matches nothing is a 200 with
  ``affected`` 0, audited like any other call;
- ``GET /samples/audit`` → the trail, newest first.

``GET /samples/count`` (public, in :mod:`app.api.data`) counts the samples retrains use, i.e.
without the quarantined ones. Request and response bodies are the pydantic models below.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from app.api.errors import ApiError, FastJSONResponse, parse_body
from app.api.state import get_state, require_api_key, store_unavailable
from app.storage import SampleListing, SampleSelection, SelectionError
from app.storage.sample_admin import MAX_ID, MAX_KEY_LENGTH, MAX_PAGE, MAX_SELECTOR_IDS

router = APIRouter(dependencies=[Depends(require_api_key)])

PRINTABLE = r"^[^\x00-\x1f\x7f]+$"  # Postgres refuses NUL in text: refuse it on SQLite too
SampleId = Annotated[int, Field(strict=True, ge=1, le=MAX_ID)]
IngestKey = Annotated[str, Field(min_length=1, max_length=MAX_KEY_LENGTH, pattern=PRINTABLE)]
Reason = Annotated[str, Field(min_length=1, max_length=1000, pattern=r"^[^\x00]+$")]  # no NUL (Postgres text)


# ---- request bodies -------------------------------------------------------------------------------
class SampleSelector(BaseModel):
    """Body of ``POST /samples/quarantine`` and ``/samples/release``: exactly one selector."""

    model_config = ConfigDict(extra="forbid")  # a misspelt selector must not select nothing silently
    ids: Annotated[list[SampleId], Field(min_length=1, max_length=MAX_SELECTOR_IDS)] | None = None
    from_id: SampleId | None = Field(None, description="inclusive; may be given without to_id")
    to_id: SampleId | None = Field(None, description="inclusive; may be given without from_id")
    ingest_key: IngestKey | None = Field(None, description="the idempotency_key the rows were ingested under")
    batch_id: SampleId | None = None
    reason: Reason | None = None
    actor: Annotated[str, Field(min_length=1, max_length=100, pattern=PRINTABLE)] | None = Field(
        None, description="who asks (recorded after the client address in the audit trail)")

    def selection(self) -> SampleSelection:
        try:
            return SampleSelection(tuple(self.ids) if self.ids is not None else None, self.from_id,
                                   self.to_id, self.ingest_key, self.batch_id)
        except SelectionError as exc:
            raise ApiError(422, str(exc)) from None


class SampleDeleteRequest(SampleSelector):
    """Body of ``POST /samples/delete``: a selector and a (non-blank) reason."""

    reason: Reason

    @field_validator("reason")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a delete needs a reason")
        return value


# ---- responses ------------------------------------------------------------------------------------
class SampleActionResult(BaseModel):
    action: str
    affected: int = Field(description="rows whose state changed (0 when the selector matched nothing)")
    audit_id: int


class SampleRow(BaseModel):
    id: int
    batch_id: int
    ingest_key: str | None
    created_at: datetime | None
    n_features: int
    label: int | None = Field(description="class index; null for a regression row")
    targets: list[float] | None = Field(description="regression targets; null for a class row")
    quarantined: bool
    quarantined_at: datetime | None
    quarantine_audit_id: int | None
    quarantine_reason: str | None
    features: list[float] | None = Field(None, description="only with features=true")


class SamplePage(BaseModel):
    samples: list[SampleRow]
    next_after_id: int | None = Field(description="pass as after_id for the next page; null on the last")


class SampleAuditEntryModel(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    selector: dict[str, Any]
    affected: int
    reason: str | None


class SampleAuditPage(BaseModel):
    entries: list[SampleAuditEntryModel]
    next_before_id: int | None = Field(description="pass as before_id for older entries; null at the start")


# ---- routes ---------------------------------------------------------------------------------------
def _page(listing: SampleListing, features: bool) -> dict[str, Any]:
    page = SamplePage(samples=[SampleRow(**r.to_dict()) for r in listing.rows],
                      next_after_id=listing.next_after_id)
    # the features key is only there when asked for
    return page.model_dump(mode="json", exclude=None if features else {"samples": {"__all__": {"features"}}})


@router.get("/samples")
async def list_samples(
        request: Request,
        from_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        to_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        batch_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        ingest_key: Annotated[str | None, Query(min_length=1, max_length=MAX_KEY_LENGTH,
                                                pattern=PRINTABLE)] = None,
        quarantined: bool | None = None,
        after_id: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        features: bool = False) -> Response:
    st = get_state(request)
    try:
        listing = await run_in_threadpool(
            lambda: st.store.list_samples(from_id=from_id, to_id=to_id, batch_id=batch_id,
                                          ingest_key=ingest_key, quarantined=quarantined,
                                          after_id=after_id, limit=limit, features=features))
    except DBAPIError as exc:
        raise store_unavailable(exc) from None
    return FastJSONResponse(_page(listing, features))


def _actor(request: Request, declared: str | None) -> str:
    host = request.client.host if request.client else "unknown"
    return f"api:{host}" + (f" ({declared})" if declared else "")


async def _act(request: Request, action: str, model: type[SampleSelector]) -> Response:
    st = get_state(request)
    body = parse_body(model, await request.body())
    selection = body.selection()
    actor = _actor(request, body.actor)
    do = {"quarantine": st.store.quarantine_samples, "release": st.store.release_samples,
          "delete": st.store.delete_samples}[action]
    try:
        outcome = await run_in_threadpool(do, selection, actor, body.reason)
    except DBAPIError as exc:
        raise store_unavailable(exc) from None
    result = SampleActionResult(action=outcome.action, affected=outcome.affected, audit_id=outcome.audit_id)
    return FastJSONResponse(result.model_dump(mode="json"))


@router.post("/samples/quarantine")
async def quarantine_samples(request: Request) -> Response:
    """Leave the selected rows out of every retrain (and its holdout) from the next one on."""
    return await _act(request, "quarantine", SampleSelector)


@router.post("/samples/release")
async def release_samples(request: Request) -> Response:
    """Undo a quarantine."""
    return await _act(request, "release", SampleSelector)


@router.post("/samples/delete")
async def delete_samples(request: Request) -> Response:
    """Delete the selected rows for good (their ingest key stays taken: a retry stores nothing)."""
    return await _act(request, "delete", SampleDeleteRequest)


@router.get("/samples/audit")
async def sample_audit(request: Request, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
                       before_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None) -> Response:
    st = get_state(request)
    try:
        trail = await run_in_threadpool(st.store.sample_audit, limit, before_id)
    except DBAPIError as exc:
        raise store_unavailable(exc) from None
    page = SampleAuditPage(entries=[SampleAuditEntryModel(**e.to_dict()) for e in trail.entries],
                           next_before_id=trail.next_before_id)
    return FastJSONResponse(page.model_dump(mode="json"))
