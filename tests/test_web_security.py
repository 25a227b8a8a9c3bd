"""Web page hardening over real HTTP: odd ids are 404s, security headers on every answer,
optional token or basic authentication, and no serving beyond localhost without it."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from db.session import Database
from db.settings import Settings
from tests.support.ops_populate import populate
from worker.console.cli import main as cli_main
from worker.console.web import WebServer, start_web
from worker.console.web_security import SECURITY_HEADERS, WebBindError, parse_id


def _get(server: WebServer, path: str,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def served(settings: Settings) -> Iterator[WebServer]:
    db = Database(settings)
    populate(db, settings.data_dir)
    db.dispose()
    server = start_web(settings, "127.0.0.1", 0)
    yield server
    server.close()


ODD_IDS = ["%C2%B2", "99999999999999999999999999999999999999", "9223372036854775808", "0",
           "-1", "1e3", "%EF%BC%91", "%00", "1%20", "%2E%2E%2F1", "0x10", "%D9%A3"]


@pytest.mark.parametrize("ident", ODD_IDS)
def test_odd_heatmap_ids_are_404_not_500(served: WebServer, ident: str) -> None:
    for path in (f"/heatmap/{ident}.png", f"/overlay/{ident}.png", f"/overlay/1.png?px={ident}",
                 f"/study/{ident}", f"/study/1.2.{ident}"):
        status, headers, _ = _get(served, path)
        assert status == 404, path
        assert headers["X-Content-Type-Options"] == "nosniff"


def test_parse_id_accepts_only_ascii_digits_of_a_64_bit_id() -> None:
    assert parse_id("42") == 42 and parse_id("9223372036854775807") == 2**63 - 1
    for text in ("²", "٣", "１", "9223372036854775808", "0", "", " 1", "+1"):
        assert parse_id(text) is None


@pytest.mark.parametrize("path", ["/", "/api/status", "/healthz", "/nope", "/static/x.css"])
def test_every_answer_carries_the_security_headers(served: WebServer, path: str) -> None:
    _, headers, _ = _get(served, path)
    for name, value in SECURITY_HEADERS.items():
        assert headers[name] == value, name
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"


def test_token_authentication(make_settings, database_url: str) -> None:  # type: ignore[no-untyped-def]
    s = make_settings(database_url=database_url, web_auth_token="s3cret-token")
    server = start_web(s, "127.0.0.1", 0)
    try:
        status, headers, _ = _get(server, "/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert _get(server, "/api/status", {"Authorization": "Bearer wrong"})[0] == 401
        assert _get(server, "/api/status", {"Authorization": "Bearer s3cret-token"})[0] == 200
        assert _get(server, "/healthz")[0] in (200, 503)  # probes need no credentials
    finally:
        server.close()
    assert s.public_dict()["web_auth_token"] == "***"


def test_basic_authentication(make_settings, database_url: str) -> None:  # type: ignore[no-untyped-def]
    s = make_settings(database_url=database_url, web_auth_user="ops",
                      web_auth_password="pa:ss")
    server = start_web(s, "127.0.0.1", 0)

    def basic(user: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    try:
        status, headers, _ = _get(server, "/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert _get(server, "/", basic("ops", "wrong"))[0] == 401
        assert _get(server, "/", {"Authorization": "Basic !!notbase64"})[0] == 401
        assert _get(server, "/", basic("ops", "pa:ss"))[0] == 200
    finally:
        server.close()


def test_binding_beyond_localhost_needs_authentication(make_settings) -> None:  # type: ignore[no-untyped-def]
    s = make_settings()
    with pytest.raises(WebBindError, match="without authentication"):
        WebServer(s, "0.0.0.0", 0)
    server = start_web(s.replace(web_auth_token="t"), "0.0.0.0", 0)
    server.close()


def test_cli_web_refuses_public_bind_without_auth(make_settings, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    s = make_settings()
    monkeypatch.setenv("CXR_DATA_DIR", str(s.data_dir))
    assert cli_main(["web", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without authentication" in err[0]
