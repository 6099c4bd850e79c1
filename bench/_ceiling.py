"""Framework-ceiling endpoints for bench/serving.py: same uvicorn stack, no model, no work.

- ``raw_app``: a bare ASGI app (reads the body, returns a constant /predict-shaped answer);
- ``fastapi_app``: the same constant behind a FastAPI route (what our routing costs).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

CONSTANT = (b'{"model_version":1,"predictions":[0],"outputs":[[0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0]]}')
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(CONSTANT)).encode())]


async def raw_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": CONSTANT})


fastapi_app = FastAPI()


@fastapi_app.post("/predict")
async def _constant(request: Request) -> Response:
    await request.body()
    return Response(CONSTANT, media_type="application/json")


@fastapi_app.get("/v2/health/ready")
async def _ready() -> Response:
    return Response(b'{"ready":true}', media_type="application/json")
