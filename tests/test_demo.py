"""The Gradio demo mounted at /ui of a real ``prsmed serve``: driven by ``gradio_client`` and by a real headless
Chromium (Debian's, through Selenium; nothing is downloaded)."""

from __future__ import annotations

import io
import os
import shutil
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from prsmed.data.synth import synthesize
from prsmed_demo.app import BASE, example_images
from prsmed_sdk import Client

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def ui(server):
    from gradio_client import Client as GradioClient

    return GradioClient(server.url + "/ui/", verbose=False)


def test_ask_through_the_mounted_demo_matches_the_api(server, ui):
    from gradio_client import handle_file

    example = example_images()[0]
    shown, answer, zone, agree, timings = ui.predict(handle_file(example), "Where is the lesion in this image?",
                                                     BASE, api_name="/ask")
    with Client(server.url) as c:
        api = c.predict(np.asarray(Image.open(example).convert("RGB")), "Where is the lesion in this image?")
    assert (answer, zone) == (api.answer, api.zone)
    assert agree.startswith("yes" if api.consistent else "no")
    assert timings["total"] > 0 and timings["round_trip"] >= timings["total"]
    drawn = np.asarray(Image.open(shown).convert("RGB"))
    source = np.asarray(Image.open(example).convert("RGB"))
    assert drawn.shape == source.shape
    changed = (drawn != source).any(axis=-1)
    assert changed[api.mask].mean() > 0.9 and not changed[~api.mask].any()  # tinted where the mask is, only there


def test_ask_about_a_dicom_frame_and_a_nifti_slice(server, ui, tmp_path):
    import nibabel as nib
    from gradio_client import handle_file

    from samples import write_dicom

    frames = np.zeros((3, 64, 64), dtype=np.uint16)
    frames[:, 8:24, 40:58] = 1000  # the lesion is top right on every frame...
    frames[2, 8:24, 40:58] = 0
    frames[2, 40:58, 6:24] = 1000  # ...but bottom left on the third
    dcm = write_dicom(tmp_path / "series.dcm", frames)
    volume = np.zeros((64, 64, 5), dtype=np.int16)
    volume[30:50, 8:26, 3] = 900
    nii = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), nii)
    question = "Where is the lesion in this image?"
    with Client(server.url) as c:
        for path, choice in ((dcm, "frame=2"), (dcm, ""), (nii, "z=3")):
            shown, answer, zone, _, _ = ui.predict(None, question, BASE, handle_file(str(path)), choice,
                                                   api_name="/ask")
            api = c.predict(f"{path}#{choice}" if choice else str(path), question)
            assert (answer, zone) == (api.answer, api.zone), (path.name, choice)
            assert Image.open(shown).size == tuple(api.image_size)
    with pytest.raises(Exception, match="frame"):
        ui.predict(None, question, BASE, handle_file(str(dcm)), "frame=9", api_name="/ask")


def test_demo_reports_bad_input_without_breaking(ui):
    from gradio_client import handle_file

    with pytest.raises(Exception, match="question"):
        ui.predict(handle_file(example_images()[0]), "   ", BASE, api_name="/ask")
    with pytest.raises(Exception, match="no-such-adapter"):
        ui.predict(handle_file(example_images()[0]), "Where?", "no-such-adapter", api_name="/ask")
    assert ui.predict(api_name="/list_adapters")["data"] == []  # still answering


@pytest.mark.slow
def test_finetune_tab_runs_a_job_to_an_adapter(ui, tmp_path):
    from gradio_client import handle_file

    root = tmp_path / "ds"
    synthesize(root, n=16, seed=5, size=64)
    archive = tmp_path / "ds.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in root.rglob("*"):
            if p.is_file():
                z.write(p, p.relative_to(root).as_posix())
    job_id, status, _ = ui.predict(handle_file(str(archive)), 1, 5e-4, "ui-adapter", api_name="/start_job")
    assert job_id and ("queued" in status or "running" in status)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status, _ = ui.predict(job_id, api_name="/job_status")
        if "succeeded" in status or "failed" in status:
            break
        time.sleep(1)
    assert "succeeded" in status and "ui-adapter" in status
    names = [row[0] for row in ui.predict(api_name="/list_adapters")["data"]]
    assert names == ["ui-adapter"]
    message, _ = ui.predict("ui-adapter", api_name="/load_adapter")
    assert message.startswith("Loaded ui-adapter")


needs_browser = pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("PRSMED_REQUIRE_BROWSER"),
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with no network beyond 127.0.0.1 (other host names do not resolve), recording every
    request it makes."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser or driver online
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1100"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver) -> list[str]:
    import json

    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


@needs_browser
def test_browser_uploads_an_image_asks_and_sees_the_overlay(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/ui/")
    wait = WebDriverWait(browser, 90)
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
    upload.send_keys(os.path.abspath(example_images()[0]))
    time.sleep(1.0)  # let the component take the file before the click reads it
    wait.until(EC.element_to_be_clickable((By.ID, "ask"))).click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay img"))
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value"))
    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    with Client(server.url) as c:
        expected = c.predict(np.asarray(Image.open(example_images()[0]).convert("RGB")),
                             "Where is the lesion in this image?").answer
    assert answer == expected
    picture = Image.open(io.BytesIO(shot.read_bytes()))
    assert picture.size[0] >= 800 and len(np.unique(np.asarray(picture.convert("L")))) > 10  # a rendered page, not blank


def _shown(driver, css: str) -> bool:
    """An <img> matching ``css`` has loaded a picture (a broken image has no natural width)."""
    return bool(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).some(i => i.complete && i.naturalWidth > 0)",
        css))


@needs_browser
def test_browser_clicking_an_example_shows_its_image_and_answers(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/ui/")
    wait = WebDriverWait(browser, 90)
    example = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "button.gallery-item:has(img)")))
    example.click()
    wait.until(lambda d: _shown(d, "#image img"))
    missing = [u for u in requested_urls(browser) if "/gradio_api/file=" in u and "/ui/gradio_api/" not in u]
    assert not missing, missing  # the file URLs keep the /ui prefix the demo is mounted under
    wait.until(EC.element_to_be_clickable((By.ID, "ask"))).click()
    wait.until(lambda d: _shown(d, "#overlay img"))
    assert wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value"))


@needs_browser
def test_browser_every_page_works_with_no_network(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(server.url + "/")
    title = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
    assert "PRS-Med service" in title[0].text
    assert wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")) # the routes are listed
    browser.get(server.url + "/ui/")
    wait.until(lambda d: d.find_elements(By.ID, "ask"))
    time.sleep(2.0)  # fonts and late scripts
    urls = requested_urls(browser)
    assert any(u.startswith(server.url + "/static_content/") for u in urls)  # the log holds both pages' requests
    # Every request over the network went to this server (chrome:// pages are the browser's own).
    outside = [u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:")) and not u.startswith(server.url)]
    assert not outside, outside


@pytest.mark.slow
def test_prsmed_demo_runs_alone_in_process(tmp_path):
    import subprocess
    import sys

    import httpx

    from serving import free_port

    port = free_port()
    log = tmp_path / "demo.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prsmed.cli", "demo", "--port", str(port), "--adapter-dir",
                                 str(tmp_path / "adapters")], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        from gradio_client import Client as GradioClient
        from gradio_client import handle_file

        ui = GradioClient(f"http://127.0.0.1:{port}/", verbose=False)
        _, answer, zone, _, _ = ui.predict(handle_file(example_images()[0]), "Where is the lesion?", BASE,
                                           api_name="/ask")
        assert answer and zone
        archive = tmp_path / "ds.zip"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("manifest.jsonl", "")
        with pytest.raises(Exception, match="needs a server"):
            ui.predict(handle_file(str(archive)), 1, 1e-4, "", api_name="/start_job")
    finally:
        proc.terminate()
        proc.wait(30)


def test_prsmed_demo_url_without_a_server_says_so():
    import subprocess
    import sys

    from serving import free_port

    out = subprocess.run([sys.executable, "-m", "prsmed.cli", "demo", "--url", f"http://127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no ready PRS-Med server" in out.stdout + out.stderr


def test_plan_tab_shows_memory_and_priced_rows(ui):
    summary, table = ui.predict("prsmed-tiny", "bf16", 8, False, 1, 100, api_name="/plan")
    assert "prsmed-tiny" in summary and "GB" in summary and "cheapest that fits" in summary
    rows = table["data"]
    assert rows and all(len(r) == 10 for r in rows)
    assert any(r[1] == "H200 141GB" and r[3] == "yes" for r in rows)


def test_the_demos_example_files_are_what_their_names_say():
    from pathlib import Path

    from prsmed.data.readers import sniff_format

    examples = Path(__file__).resolve().parent.parent / "demo" / "examples"
    files = sorted(examples.glob("*"))
    assert files
    for path in files:
        want = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".dcm": "dicom"}.get(path.suffix.lower())
        assert want is None or sniff_format(path.read_bytes()[:544], path.name) == want, path.name
