"""The auth and body-limit middleware, in-process through httpx's ASGI transport."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from prsmed_service.middleware import AuthMiddleware, BodyLimitMiddleware


async def echo(request):
    body = await request.body()
    return JSONResponse({"bytes": len(body)})


def make_app(token=None, public_predict=False, limit=1000):
    app = Starlette(routes=[Route(p, echo, methods=["GET", "POST"]) for p in ("/v1/predict", "/v1/models", "/readyz")])
    return AuthMiddleware(BodyLimitMiddleware(app, limits={"/v1/predict": limit}), token=token,
                          public_predict=public_predict)


def call(app, method, path, **kw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def test_token_required_on_v1_only():
    app = make_app(token="tok")
    assert (call(app, "GET", "/v1/models")).status_code == 401
    assert (call(app, "POST", "/v1/predict")).status_code == 401
    assert (call(app, "GET", "/v1/models", headers={"Authorization": "Bearer tok"})).status_code == 200
    assert (call(app, "GET", "/v1/models", headers={"Authorization": "Basic tok"})).status_code == 401
    assert (call(app, "GET", "/readyz")).status_code == 200


def test_public_predict_opens_predict_only():
    app = make_app(token="tok", public_predict=True)
    assert (call(app, "POST", "/v1/predict", content=b"x")).status_code == 200
    assert (call(app, "GET", "/v1/models")).status_code == 401


def test_body_limit_by_header_and_by_counting():
    app = make_app(limit=1000)
    assert (call(app, "POST", "/v1/predict", content=b"x" * 999)).json() == {"bytes": 999}
    too_big = call(app, "POST", "/v1/predict", content=b"x" * 1001)
    assert too_big.status_code == 413 and "1,000 bytes" in too_big.json()["message"]

    async def chunks():  # no Content-Length: counted while read
        for _ in range(4):
            yield b"y" * 400

    streamed = call(app, "POST", "/v1/predict", content=chunks())
    assert streamed.status_code == 413
