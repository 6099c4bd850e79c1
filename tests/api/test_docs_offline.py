"""/docs and /redoc work without the internet: the HTML names no external host and every asset
it references is served by the app itself (fastapi-offline's wheel)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from tests.conftest import fast_settings


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, template_data_dir):
    from tests.helpers.server import copy_store

    data_dir = copy_store(template_data_dir, tmp_path_factory.mktemp("docs") / "data")
    with TestClient(create_app(fast_settings(data_dir))) as c:
        yield c


def _references(html: str) -> list[str]:
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""(?:url|spec-url)\s*:\s*['"]([^'"]+)['"]""", html)
    urls += re.findall(r"""spec-url=["']([^"']+)["']""", html)
    return urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_reference_no_external_host_and_the_assets_load(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    html = r.text
    assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), \
        re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"']*", html, re.I)
    refs = _references(html)
    assets = [u for u in refs if u.endswith((".js", ".css", ".png"))]
    assert len(assets) >= (3 if page == "/docs" else 2), refs
    for url in refs:
        assert url.startswith("/"), url  # same origin
        got = client.get(url)
        assert got.status_code == 200, (url, got.status_code)
        if url.endswith(".js"):
            assert len(got.content) > 100_000  # the real bundle, not a stub
    assert "/openapi.json" in refs or "'/openapi.json'" in html or '"/openapi.json"' in html
