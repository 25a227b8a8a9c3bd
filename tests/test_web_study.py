"""The radiologists' study page, the list's filter and paging, and the models page: real
HTTP, real rows and files, and headless Chromium screenshots checked for the overlay."""

from __future__ import annotations

import io
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.models import Evaluation, Instance, ModelVersion, Prediction, Study, StudyState, utcnow
from db.session import Database
from db.settings import Settings
from tests.support.dicom_factory import make_cxr, write
from tests.support.ops_populate import SECRET_ACCESSION, SECRET_PATIENT_ID, Populated, populate
from worker.console.web import WebServer, start_web

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWER = "https://pacs.example.org/viewer?StudyInstanceUID={study_uid}&acc={accession_number}"
ARTIFACTS = Path(__file__).parent / "_artifacts"
# populate()'s heatmap: a hot spot at x = 40/64, y = 24/64 of the image
HOT = (40 / 64, 24 / 64)
PLOTS = ["roc", "pr", "reliability", "hist-class-a", "hist-source-a", "confusion-a"]


@dataclass
class Site:
    server: WebServer
    pop: Populated
    settings: Settings
    prediction_id: int


def _radiograph(rows: int = 384, cols: int = 320) -> np.ndarray:
    """A chest-like phantom with structure (ribs as stripes), 12-bit."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    lungs = 0.35 + 0.35 * np.exp(-(((xx - cols / 2) / (cols / 3)) ** 2))
    ribs = 0.08 * np.sin(yy / 9.0)
    return (np.clip(lungs + ribs, 0, 1) * 4095).astype(np.uint16)


def _report(settings: Settings) -> Path:
    from PIL import Image

    run = settings.reports_dir / "run-7"
    run.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(PLOTS):
        Image.new("RGB", (400, 300), (40 * i, 120, 200 - 30 * i)).save(run / f"{name}.png")
    (run / "index.html").write_text(
        "<!doctype html><html><head><title>run 7 report</title></head><body>"
        "<h1>Nightly run 7</h1>" + "".join(f"<img src='{n}.png'>" for n in PLOTS)
        + "</body></html>")
    return run / "index.html"


@pytest.fixture
def site(make_settings, tmp_path: Path) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'web.db'}",
                             viewer_url_template=VIEWER)
    db = Database(settings)
    pop = populate(db, settings.data_dir)
    source = make_cxr(pixels=_radiograph(), modality="CR")
    spooled = write(source, settings.spool_dir / "ab" / "source.dcm")
    index = _report(settings)
    with db.session() as s:
        pred = s.scalars(select(Prediction).where(Prediction.heatmap_path.is_not(None))).one()
        s.get(Instance, pred.instance_id).path = str(spooled)  # type: ignore[union-attr]
        prediction_id = pred.id
        model = s.scalars(select(ModelVersion)).one()
        s.add(Evaluation(model_version_id=model.id, kind="test", dataset="run 7",
                         n_images=40, auc=0.9, report_path=str(index)))
        now = utcnow()
        for i in range(60):
            s.add(Study(study_uid=f"1.2.826.0.1.3680043.8.498.100{i:02d}",
                        state=StudyState.DONE, received_at=now - timedelta(days=1, minutes=i)))
    db.dispose()
    server = start_web(settings, "127.0.0.1", 0)
    yield Site(server, pop, settings, prediction_id)
    server.close()


def _get(site: Site, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{site.server.port}{path}",
                                    timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_study_page_shows_what_a_radiologist_needs(site: Site) -> None:
    status, ctype, body = _get(site, f"/study/{site.pop.done_uid}")
    assert status == 200 and ctype.startswith("text/html")
    page = body.decode()
    assert f"Accession {SECRET_ACCESSION}" in page
    assert SECRET_PATIENT_ID not in page
    for text in ("0.870", "POSITIVE", "0.420", site.pop.model_version, "gradcam",
                 "skipped: lateral view",
                 "association rejected: called AE title not recognised",
                 f'src="/overlay/{site.prediction_id}.png"'):
        assert text in page, text
    assert page.count("<tr><td>SR</td>") == 1 and page.count("<tr><td>SC</td>") == 1
    viewer = ("https://pacs.example.org/viewer?StudyInstanceUID=1.2.826.0.1.3680043.8.498.1"
              "&amp;acc=ACC-SECRET-0815")
    assert f'href="{viewer}"' in page
    assert _get(site, "/study/1.2.3.999")[0] == 404
    assert _get(site, "/study/..%2F..%2Fetc")[0] == 404
    assert _get(site, "/overlay/999999.png")[0] == 404
    assert _get(site, f"/overlay/{site.prediction_id}.png?px=99999")[0] == 404


def test_overlay_is_the_sc_blend_over_the_radiograph(site: Site) -> None:
    from PIL import Image

    from dicom_node.burnin import overlay
    from dicom_node.pixels import load_image_file

    status, ctype, png = _get(site, f"/overlay/{site.prediction_id}.png")
    assert status == 200 and ctype == "image/png"
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    spooled = next(site.settings.spool_dir.rglob("source.dcm"))
    expected = overlay(load_image_file(spooled), np.load(site.pop.heatmap_path), max_side=768)
    assert got.shape == expected.shape == (384, 320, 3)
    assert np.array_equal(got, expected)


def test_list_filters_by_state_and_pages(site: Site) -> None:
    _, _, body = _get(site, "/")
    page = body.decode()
    assert f'href="/study/{site.pop.done_uid}"' in page
    assert page.count('<tr><td class="uid">') == 50
    assert "1–50 of 63" in page and 'rel="next" href="/?page=2"' in page
    _, _, body = _get(site, "/?page=2")
    assert body.decode().count('<tr><td class="uid">') == 13
    assert 'rel="prev"' in body.decode() and 'rel="next"' not in body.decode()
    _, _, body = _get(site, "/?state=queued")
    page = body.decode()
    assert page.count('<tr><td class="uid">') == 1 and site.pop.queued_uid in page
    assert "1–1 of 1" in page
    _, _, body = _get(site, "/?state=failed")
    page = body.decode()
    assert f'href="/study/{site.pop.failed_uid}"' in page
    assert f'href="/study/{site.pop.done_uid}"' not in page
    assert _get(site, "/?state=bogus")[0] == 400
    assert _get(site, "/?page=0")[0] == 400


def test_models_page_links_reports_and_serves_them(site: Site) -> None:
    _, _, body = _get(site, "/models")
    page = body.decode()
    assert 'href="/reports/run-7/index.html"' in page
    assert page.count('class="plot"') == len(PLOTS) + 1  # run 7 and populate()'s roc.png
    status, ctype, html = _get(site, "/reports/run-7/index.html")
    assert status == 200 and ctype.startswith("text/html") and b"Nightly run 7" in html
    assert _get(site, "/reports/run-7/roc.png")[1] == "image/png"
    assert _get(site, "/reports/../web.db")[0] == 404
    _, _, body = _get(site, "/")
    assert f'href="/models#model-{site.pop.model_version}"' in body.decode()


def _keep(shot: Path, name: str) -> None:
    if ARTIFACTS.is_dir():
        shutil.copy(shot, ARTIFACTS / name)


@pytest.mark.slow
def test_study_and_models_pages_in_headless_chromium(site: Site, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    from PIL import Image

    base = f"http://127.0.0.1:{site.server.port}"
    study_shot, overlay_shot, models_shot, list_shot, thumb_shot = (
        tmp_path / n for n in ("study.png", "overlay.png", "models.png", "list.png",
                               "thumb.png"))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{base}/", wait_until="load")
            page.locator("img.heatmap").first.screenshot(path=str(thumb_shot))
            page.screenshot(path=str(list_shot), full_page=True)
            page.locator(f'a[href="/study/{site.pop.done_uid}"]').click()
            page.wait_for_load_state("load")
            assert page.url == f"{base}/study/{site.pop.done_uid}"
            assert page.locator("h1").inner_text() == f"Accession {SECRET_ACCESSION}"
            assert page.locator("#call").inner_text() == "POSITIVE"
            img = page.locator("img.overlay")
            assert img.evaluate("i => i.complete && i.naturalWidth") == 320
            img.screenshot(path=str(overlay_shot))
            page.screenshot(path=str(study_shot), full_page=True)

            page.goto(f"{base}/models", wait_until="load")
            boxes = [page.locator("img.plot").nth(i).bounding_box()
                     for i in range(page.locator("img.plot").count())]
            page.screenshot(path=str(models_shot), full_page=True)
        finally:
            browser.close()
    for shot, name in ((study_shot, "study_page.png"), (overlay_shot, "study_overlay.png"),
                       (models_shot, "models_page.png"), (list_shot, "list_page.png")):
        _keep(shot, name)

    # The overlay as the browser drew it: colour where the heatmap is hot, the grey
    # radiograph (with its rib structure) where it is cold.
    shot = np.asarray(Image.open(overlay_shot).convert("RGB")).astype(np.int16)
    h, w = shot.shape[:2]
    chroma = shot.max(axis=2) - shot.min(axis=2)
    hot = chroma[int(HOT[1] * h) - 3:int(HOT[1] * h) + 4, int(HOT[0] * w) - 3:int(HOT[0] * w) + 4]
    assert hot.mean() > 60, hot.mean()
    cold = shot[int(0.85 * h):int(0.97 * h), int(0.03 * w):int(0.2 * w)]
    cold_chroma = cold.max(axis=2) - cold.min(axis=2)
    assert cold_chroma.mean() < 10, cold_chroma.mean()
    assert cold.mean() > 40 and cold[..., 0].std() > 3  # the radiograph, not black or flat
    coloured = float((chroma > 30).mean())
    assert 0.02 < coloured < 0.6, coloured  # a blob over the image, not a colour map

    # The list's thumbnail is the same overlay, not the bare colour map.
    thumb = np.asarray(Image.open(thumb_shot).convert("RGB")).astype(np.int16)
    thumb_chroma = thumb.max(axis=2) - thumb.min(axis=2)
    assert 0.02 < float((thumb_chroma > 30).mean()) < 0.6
    assert float((thumb_chroma < 10).mean()) > 0.3  # grey radiograph around the blob

    # The plots sit in a grid: several per row.
    assert len(boxes) == len(PLOTS) + 1 and all(boxes)
    rows: dict[int, list[float]] = {}
    for b in boxes:
        assert b is not None
        rows.setdefault(round(b["y"]), []).append(b["x"])
    assert max(len(xs) for xs in rows.values()) >= 3, rows


def test_viewer_template_is_validated_at_load_and_filled_url_encoded(make_settings) -> None:  # type: ignore[no-untyped-def]
    from db.settings import SettingsError
    from worker.console.web_study import viewer_url

    for bad in ("javascript:alert(1)//{study_uid}", "https://pacs/{patient_id}",
                "https://pacs/{study_uid"):
        with pytest.raises(SettingsError, match="viewer_url_template"):
            make_settings(viewer_url_template=bad)
    assert viewer_url("", "1.2", None) is None
    assert viewer_url("https://p/v?s={study_uid}&a={accession_number}", "1.2.3",
                      "A&B 7") == "https://p/v?s=1.2.3&a=A%26B%207"
