"""The HTTP service on a tiny run: typed endpoints, limits (413, 422), the token (401), CORS, saturation (503)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def loaded(tiny_ml100k_run: dict[str, Path]):
    from palr.rank.pipeline import PALR

    return PALR.load(tiny_ml100k_run["palr"], tiny_ml100k_run["data_dir"])


def serve(palr, **cfg):
    from serving import BackgroundServer

    from palr.serve.app import ServiceConfig, create_app

    return BackgroundServer(create_app(palr, config=ServiceConfig(**cfg)))


def test_items_users_and_recommend_are_typed(loaded) -> None:
    with serve(loaded) as url:
        base = url.removesuffix("/v1")
        health = httpx.get(f"{base}/health").json()
        assert health["max_k"] == 20 and health["auth"] is False
        found = httpx.get(f"{base}/items", params={"q": "star WARS"}).json()
        assert found["total"] == 1 and found["items"][0]["title"] == "Star Wars (1977)"
        assert found["items"][0]["tags"] and found["items"][0]["popularity"] > 0
        assert len(httpx.get(f"{base}/items", params={"q": "movie", "limit": 3}).json()["items"]) == 3
        u = httpx.get(f"{base}/users/1").json()
        assert u["user"] == "1" and u["profile"] and u["history"][0]["title"]
        assert httpx.get(f"{base}/users/nobody").status_code == 404
        r = httpx.post(f"{base}/recommend", json={"user": "1", "k": 5, "explain": True}, timeout=60)
        body = r.json()
        assert r.status_code == 200 and len(body["items"]) == 5 and body["profile"] == u["profile"]
        seen = {h["item"] for h in u["history"]}
        assert not seen & {it["item"] for it in body["items"]}
        assert all(it["explanation"] and 1 <= it["retriever_rank"] <= 20 for it in body["items"])
        schema = httpx.get(f"{base}/openapi.json").json()["components"]["schemas"]
        assert {"RecommendRequest", "RecommendResponse", "ItemsResponse", "UserResponse"} <= set(schema)


def test_limits_answer_413_and_422_without_echoing_input(loaded) -> None:
    with serve(loaded, max_body_bytes=64 * 1024) as url:
        base = url.removesuffix("/v1")
        big = b'{"user": "' + b"x" * (10 * 1024 * 1024) + b'"}'
        r = httpx.post(f"{base}/recommend", content=big, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 413 and len(r.content) < 200

        def chunks():  # no content-length: the limit holds while streaming too
            for _ in range(100):
                yield b"x" * 4096

        r = httpx.post(f"{base}/recommend", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        for body, what in [({"user": "1", "k": 0}, "greater than or equal to 1"), ({"user": "1", "k": 21}, "between 1 and 20"),
                           ({"user": "1", "history": ["1"]}, "not both"), ({"k": 3}, "give 'user' or 'history'"),
                           ({"user": "u" * 300}, "at most 256"), ({"history": ["1"] * 2001}, "at most 2000"),
                           ({"user": "1", "kk": 3}, "Extra inputs")]:
            r = httpx.post(f"{base}/recommend", json=body, timeout=60)
            assert r.status_code == 422, body
            assert what in r.text and len(r.text) < 400, r.text  # the message, never the input
        r = httpx.post(f"{base}/recommend", content=b'{"user": "1", ' + b" " * 50_000,
                       headers={"content-type": "application/json"})
        assert r.status_code == 422 and len(r.text) < 300
        r = httpx.post(f"{base}/recommend", json={"history": [str(i) for i in range(1, 61)] + ["nope"] * 900, "k": 3})
        assert r.status_code == 200 and r.json()["items"] == []
        assert any("900 unknown item id(s)" in n for n in r.json()["notes"])
        assert any("covers 60 of the 60 items" in n for n in r.json()["notes"])


def test_token_cors_and_saturation(loaded) -> None:
    with serve(loaded, token="T", cors_origins=["http://example.org"]) as url:
        base = url.removesuffix("/v1")
        assert httpx.get(f"{base}/health").json()["auth"] is True  # health and the page stay open
        assert httpx.get(f"{base}/").status_code == 200
        r = httpx.post(f"{base}/recommend", json={"user": "1"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}/items", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{base}/items", headers={"authorization": "Bearer T"}).status_code == 200
        pre = httpx.options(f"{base}/recommend", headers={"origin": "http://example.org",
                                                           "access-control-request-method": "POST"})
        assert pre.headers.get("access-control-allow-origin") == "http://example.org"
    with serve(loaded) as url:  # no --cors-origin: no CORS header for anybody
        r = httpx.get(f"{url.removesuffix('/v1')}/health", headers={"origin": "http://example.org"})
        assert "access-control-allow-origin" not in r.headers


def test_saturated_service_answers_503(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    real = loaded.recommend
    release = threading.Event()

    def held(*a, **kw):  # the admitted request holds its slot until the turned-away ones have answered
        release.wait(timeout=60)
        return real(*a, **kw)

    monkeypatch.setattr(loaded, "recommend", held)
    with serve(loaded, max_concurrent=1, max_queue=1) as url:
        base = url.removesuffix("/v1")

        async def burst() -> tuple[list[int], list[int]]:
            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [asyncio.create_task(client.post(f"{base}/recommend", json={"user": "1"})) for _ in range(8)]
                try:
                    done: set[asyncio.Task] = set()
                    deadline = asyncio.get_running_loop().time() + 30
                    while len(done) < 6:  # 8 sent, 1 computing, 1 waiting: 6 answered while the slot is held
                        left = deadline - asyncio.get_running_loop().time()
                        if left <= 0:
                            break
                        now, _ = await asyncio.wait([t for t in tasks if t not in done], timeout=left,
                                                    return_when=asyncio.FIRST_COMPLETED)
                        done |= now
                    early = [t.result().status_code for t in done]
                finally:
                    release.set()
                rs = await asyncio.gather(*tasks)
            return early, [r.status_code for r in rs]

        early, codes = asyncio.run(burst())
        assert early == [503] * 6, early  # turned away at once, while the slot was held
        assert sorted(codes) == [200] * 2 + [503] * 6, codes  # one ran, one waited and then ran


def test_cli_refuses_bad_recommend_arguments(tiny_ml100k_run: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from palr.cli.main import app, main
    from palr.core.errors import ConfigError, InputError

    run, data = str(tiny_ml100k_run["palr"]), str(tiny_ml100k_run["data_dir"])
    runner = CliRunner()
    # each is refused with palr's own error (which `palr` turns into exit status 2 and one line), not a crash
    for args, what, kind in [(["--user", "1", "--k", "0"], "--k", ConfigError),
                             (["--user", "1", "--mode", "foo"], "--mode", ConfigError),
                             (["--user", "1", "--history", "2"], "not both", InputError),
                             (["--user", "1", "--k", "100000"], "between 1", InputError)]:
        r = runner.invoke(app, ["recommend", "--run", run, "--data-dir", data, *args])
        assert type(r.exception) is kind, (args, r.exception, r.output)
        assert what in str(r.exception), (args, str(r.exception))
    with pytest.raises(SystemExit) as stop:
        main(["recommend", "--run", run, "--data-dir", data, "--user", "1", "--k", "0"])
    assert stop.value.code == 2
    r = runner.invoke(app, ["recommend", "--run", run, "--data-dir", data, "--user", "1", "--k", "3", "--json"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)["items"]) == 3
