"""The auth and body-limit middleware, in-process through httpx's ASGI transport."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from prsmed_service.middleware import (AuthMiddleware, BodyLimitMiddleware, HeaderLimitMiddleware,
                                      MultipartGuardMiddleware)


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


def test_too_many_or_too_large_headers_are_431():
    app = HeaderLimitMiddleware(make_app(), max_bytes=2000, max_count=20)
    assert call(app, "GET", "/v1/models", headers={"X-A": "a" * 1000}).status_code == 200
    big = call(app, "GET", "/v1/models", headers={"X-A": "a" * 2000})
    assert big.status_code == 431 and "2,000 bytes" in big.json()["message"]
    many = call(app, "GET", "/v1/models", headers={f"X-{i}": "1" for i in range(25)})
    assert many.status_code == 431 and "20 headers" in many.json()["message"]


def _multipart(*parts: bytes, boundary: bytes = b"b") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"


IMAGE = b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + b"\x89PNG" + b"\0" * 3000
QUESTION = b'Content-Disposition: form-data; name="question"\r\n\r\nWhere?'


async def parse_like_bentoml(request):
    """What BentoML does with a form: Starlette parses it, and any exception there becomes a 500."""
    try:
        form = await request.form(max_files=5, max_fields=5, max_part_size=100)
    except Exception:
        return JSONResponse({"error": "An unexpected error has occurred"}, status_code=500)
    if form.get("question") == "boom":  # a failure of the server's own, with a good body
        return JSONResponse({"error": "An unexpected error has occurred"}, status_code=500)
    return JSONResponse({"fields": sorted(form.keys()), "image": len(await form["image"].read())})


def test_a_malformed_multipart_body_is_400_and_a_good_one_passes_whole():
    inner = Starlette(routes=[Route(p, parse_like_bentoml, methods=["POST"]) for p in ("/v1/predict", "/v1/models")])
    app = MultipartGuardMiddleware(inner, max_parts=5, max_field_bytes=100)
    form = {"Content-Type": "multipart/form-data; boundary=b"}
    good = _multipart(IMAGE, QUESTION)
    assert call(app, "POST", "/v1/predict", content=good, headers=form).json() == \
        {"fields": ["image", "question"], "image": 3004}
    cases = {
        "invalid character": _multipart(b"Cont\xf0nt-Disposition: form-data; name=\"x\"\r\n\r\nv"),
        "no Content-Disposition name": _multipart(b"Content-Type: text/plain\r\n\r\nv"),
        "more than 5 parts": _multipart(*[QUESTION] * 6),
        "over 100 bytes": _multipart(b'Content-Disposition: form-data; name="question"\r\n\r\n' + b"q" * 200),
    }
    for words, body in cases.items():
        r = call(app, "POST", "/v1/predict", content=body, headers=form)
        assert r.status_code == 400 and words in r.json()["message"], (words, r.text)
    r = call(app, "POST", "/v1/predict", content=good, headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400 and "no boundary" in r.json()["message"]
    boom = _multipart(IMAGE, b'Content-Disposition: form-data; name="question"\r\n\r\nboom')
    r = call(app, "POST", "/v1/predict", content=boom, headers=form)
    assert r.status_code == 500 and r.json() == {"error": "An unexpected error has occurred"}  # not the body's fault
    # other routes are not its business
    assert call(app, "POST", "/v1/models", content=cases["more than 5 parts"], headers=form).status_code == 500
