"""The operator's web page: real HTTP, real database rows, and a real headless Chromium."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from db.session import Database
from db.settings import Settings
from tests.support.ops_populate import SECRET_PATIENT_ID, Populated, populate
from worker.console.web import WebServer, render_heatmap_png, start_web

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[WebServer, Populated]]:
    db = Database(settings)
    pop = populate(db, settings.data_dir)
    db.dispose()
    server = start_web(settings, "127.0.0.1", 0)
    yield server, pop
    server.close()


def _get(server: WebServer, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_page_lists_studies_models_heatmaps_and_plots(served) -> None:  # type: ignore[no-untyped-def]
    server, pop = served
    status, ctype, body = _get(server, "/")
    assert status == 200 and ctype.startswith("text/html")
    page = body.decode()
    for text in (pop.done_uid, pop.queued_uid, pop.failed_uid, "POSITIVE", "0.870", "0.910",
                 "Pneumonia pattern",
                 pop.model_version, "Not a diagnostic device", "called AE title"):
        assert text in page
    assert SECRET_PATIENT_ID not in page
    assert "http://" not in page.replace(f"http://127.0.0.1:{server.port}", "")  # no CDN

    heat = page.split('src="/overlay/', 1)[1].split('"', 1)[0]
    status, ctype, png = _get(server, "/overlay/" + heat.replace("&amp;", "&"))
    assert status == 200 and ctype == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    status, ctype, png = _get(server, "/heatmap/" + heat.split(".png")[0] + ".png")
    assert status == 200 and ctype == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"

    _, _, models = _get(server, "/models")
    plot = models.decode().split('src="/reports/', 1)[1].split('"', 1)[0]
    status, ctype, png = _get(server, "/reports/" + plot)
    assert status == 200 and png == pop.report_path.read_bytes()

    status, _, css = _get(server, "/static/style.css")
    assert status == 200 and b"font-family" in css


def test_api_health_and_refusals(served) -> None:  # type: ignore[no-untyped-def]
    server, pop = served
    status, _, body = _get(server, "/api/status")
    assert status == 200
    assert {s["study_uid"] for s in json.loads(body)["studies"]} >= {pop.done_uid}
    status, _, body = _get(server, "/metrics")
    assert status == 200
    assert 'cxr_studies{state="done"} 1.0' in body.decode()
    assert f'cxr_production_model_info{{version="{pop.model_version}"}} 1.0' in body.decode()
    status, _, body = _get(server, "/healthz")
    report = json.loads(body)
    # No worker runs in this test: health names both; the populated queued study is old.
    assert status == 503 and report["status"] == "unhealthy"
    assert set(report["checks"]) == {"database", "broker", "disk", "inference_worker",
                                     "delivery_worker", "queue_age", "production_model",
                                     "nightly"}
    assert {n for n, c in report["checks"].items() if not c["ok"]} == {
        "inference_worker", "delivery_worker", "queue_age"}
    status, _, body = _get(server, "/healthz?check=database,broker,disk")
    assert status == 200 and set(json.loads(body)["checks"]) == {"database", "broker", "disk"}
    assert _get(server, "/healthz?check=nope")[0] == 400
    assert _get(server, "/reports/../cxr-triage.db")[0] == 404
    assert _get(server, "/static/../web.py")[0] == 404
    assert _get(server, "/heatmap/999999.png")[0] == 404
    assert _get(server, "/nope")[0] == 404


def test_health_is_503_when_disk_threshold_cannot_be_met(make_settings) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(min_free_mb=10**9)
    server = start_web(settings, "127.0.0.1", 0)
    try:
        status, _, body = _get(server, "/healthz")
    finally:
        server.close()
    report = json.loads(body)
    assert status == 503 and report["status"] == "unhealthy"
    assert report["checks"]["disk"]["ok"] is False
    assert report["checks"]["database"]["ok"] is True


def test_heatmap_renders_from_npy_and_png(tmp_path: Path) -> None:
    from PIL import Image

    npy = tmp_path / "map.npy"
    np.save(npy, np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30))
    first = Image.open(__import__("io").BytesIO(render_heatmap_png(npy)))
    assert first.mode == "RGB" and max(first.size) == 192
    pixels = np.asarray(first)
    assert pixels.std() > 10  # a gradient, not a flat image
    png = tmp_path / "map.png"
    first.save(png)
    second = Image.open(__import__("io").BytesIO(render_heatmap_png(png)))
    assert second.size == first.size


def test_page_in_headless_chromium(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    server, pop = served
    shot = tmp_path / "page.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{server.port}/", wait_until="load")
            assert page.title() == "cxr-triage"
            rows = page.locator("#studies tbody tr")
            assert rows.count() == 3
            assert pop.done_uid in page.locator("#studies").inner_text()
            assert pop.model_version in page.locator("#models").inner_text()
            heat = page.locator("img.heatmap").first
            # the radiograph is not in this spool: the heatmap alone, at its own 64 px
            assert heat.evaluate("img => img.complete && img.naturalWidth") == 64
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[1] == 1280 and img.shape[0] >= 600
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 100  # text, tables, heatmap colours
    keep = Path(__file__).parent / "_artifacts"
    if keep.is_dir():
        shutil.copy(shot, keep / "web_page.png")
