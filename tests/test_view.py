"""The live view: its protocol from a plain HTTP client (pixel stamps through the drawing's resize and the JPEG, the
events equal to the log's records), and the page in a real headless browser (Debian's chromium and chromedriver,
driven by Selenium), over HTTP on loopback and over HTTPS with a token."""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT

from edge_pfm.service.listener import ListenAddress, Listener, ListenerSecurity
from edge_pfm.service.view import BOUNDARY, LiveView
from edge_pfm.sources.simulated.stamp import read_stamp

CAMERA = "synthetic:fps=15,width=640,height=480"  # drawn at 360 px high: resized by 0.75
ARTIFACTS = ROOT / "build" / "test-artifacts"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
INSTALL = "apt install chromium chromium-driver (as .ci/run does) and pip install selenium (the test extra)"


def read_parts(response, count: int) -> list[tuple[dict, bytes]]:
    """`count` parts of a multipart/x-mixed-replace stream: (headers, body)."""
    parts = []
    while len(parts) < count:
        line = response.readline()
        if not line:
            break
        if line.strip() != f"--{BOUNDARY}".encode():
            continue
        headers = {}
        while (line := response.readline().strip()):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, response.read(int(headers["content-length"]))))
    return parts


def read_events(response, count: int) -> list[dict]:
    records, data = [], None
    while len(records) < count:
        line = response.readline().decode()
        if not line:
            break
        if line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "\n" and data is not None:
            records.append(data)
            data = None
    return records


@pytest.fixture
def view_run(calibrated_bundle, tmp_path):
    """A Runner on two synthetic cameras with the view, in this process, and its listener on 127.0.0.1:0."""
    from edge_pfm.runtime import RunConfig, Runner
    from edge_pfm.sources import open_source
    from edge_pfm.sources.simulated.cameras import synthetic_bank

    bank = synthetic_bank(CAMERA)
    view = LiveView()
    log = tmp_path / "decisions.jsonl"
    runner = Runner(calibrated_bundle, open_source(CAMERA, "white_light", bank), open_source(CAMERA, "fluorescence", bank),
                    config=RunConfig(backend="onnxruntime", log=str(log)), view=view)
    listener = Listener(ListenAddress.parse("127.0.0.1:0"), ListenerSecurity(), view.routes()).start()
    summary = {}
    thread = threading.Thread(target=lambda: summary.update(runner.run(30)), daemon=True)
    thread.start()
    yield listener.url, runner, log
    runner.stop_event.set()
    thread.join(20)
    listener.stop()
    assert not runner.error, runner.error


def test_the_stream_carries_each_pair_s_stamps_through_the_resize_and_the_jpeg(view_run):
    url, runner, _ = view_run
    with urllib.request.urlopen(url + "/stream.mjpg", timeout=30) as r:
        assert r.headers["Content-Type"] == f"multipart/x-mixed-replace; boundary={BOUNDARY}"
        parts = read_parts(r, 12)
    assert len(parts) == 12
    ids = [int(h["x-frame-id"]) for h, _ in parts]
    assert ids == sorted(set(ids))  # increasing: each part a newer frame
    stamps = []
    for headers, body in parts:
        frame = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        canvas = frame[56:]  # below the class bar (overlay.annotate)
        scale = canvas.shape[0] / 480
        white_w = round(640 * scale)
        (wi, wm), (fi, fm) = read_stamp(canvas[:, :white_w], scale), read_stamp(canvas[:, white_w:], scale)
        assert (wm, fm) == ("white_light", "fluorescence"), headers
        assert int(headers["x-capture-ns"]) > 0
        stamps.append((wi, fi))
    assert [w for w, _ in stamps] == sorted({w for w, _ in stamps}), stamps  # frame indices only increase
    assert [f for _, f in stamps] == sorted({f for _, f in stamps}), stamps


def test_events_are_the_log_s_records_and_the_snapshot_is_the_newest_frame(view_run):
    url, runner, log = view_run
    with urllib.request.urlopen(url + "/events", timeout=30) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        records = read_events(r, 8)
    numbers = [rec["n"] for rec in records]
    assert numbers == list(range(numbers[0], numbers[0] + 8))  # one event per decision, none skipped
    logged = {rec["n"]: rec for rec in map(json.loads, log.read_text().splitlines()[1:])}
    assert all(logged[rec["n"]] == rec for rec in records)  # the same records the log writes
    with urllib.request.urlopen(url + "/snapshot.jpg", timeout=10) as r:
        assert r.headers["Content-Type"] == "image/jpeg"
        first = int(r.headers["X-Frame-Id"])
        assert cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR).shape[0] == 56 + 360
    time.sleep(0.5)
    with urllib.request.urlopen(url + "/snapshot.jpg", timeout=10) as r:
        assert int(r.headers["X-Frame-Id"]) > first


def test_a_client_that_never_reads_does_not_slow_the_others(view_run):
    """Each client has its own latest-frame slot: a stalled one holds its socket, not the stream."""
    url, runner, _ = view_run
    stalled = urllib.request.urlopen(url + "/stream.mjpg", timeout=30)  # connected, never read
    try:
        time.sleep(3)
        before = runner.counts["pairs_inferred"]
        with urllib.request.urlopen(url + "/stream.mjpg", timeout=30) as r:
            t0 = time.monotonic()
            parts = read_parts(r, 15)
            took = time.monotonic() - t0
        assert len(parts) == 15 and took < 5, took  # the drawing runs at 15 fps: 15 parts in about a second
        assert runner.counts["pairs_inferred"] > before
    finally:
        stalled.close()


# ---------------------------------------------------------------- the page, in a real browser

def _browser(tls: bool = False):
    webdriver = pytest.importorskip("selenium.webdriver", reason=INSTALL)
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(f"chromium and chromedriver are not installed: {INSTALL}")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,700"):
        options.add_argument(arg)
    if tls:
        options.add_argument("--ignore-certificate-errors")  # the test's own self-signed certificate
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "view.crt", tmp_path / "view.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _run_with_view(bundle: Path, tmp_path: Path, config: Path | None = None) -> tuple[subprocess.Popen, str, Path]:
    """`edge-pfm run --view 127.0.0.1:0` on synthetic cameras, as a user starts it; -> (process, view URL, log)."""
    log = tmp_path / "decisions.jsonl"
    argv = [sys.executable, "-m", "edge_pfm", "run", "--bundle", str(bundle), "--white", CAMERA + ",label=hsil",
            "--fluo", CAMERA, "--backend", "onnxruntime", "--seconds", "60", "--log", str(log),
            "--view", "127.0.0.1:0", *(["--config", str(config)] if config else [])]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"live view on (https?://\S+)/", "".join(out))
        if m:
            return proc, m.group(1), log
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("".join(out))


def _check_page(driver, base: str, log: Path, shot: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base + "/")
    WebDriverWait(driver, 30).until(lambda d: int(d.find_element(By.ID, "decision").get_attribute("data-n")) > 0)
    img = driver.find_element(By.ID, "stream")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return arguments[0].naturalWidth", img) > 0)
    first = img.screenshot_as_png
    time.sleep(1.5)
    assert img.screenshot_as_png != first  # the frames change
    # the class text follows /events: what the page shows is the logged record it names
    el = driver.find_element(By.ID, "decision")
    n, shown = int(el.get_attribute("data-n")), el.text
    logged = {r["n"]: r for r in map(json.loads, log.read_text().splitlines()[1:])}
    assert shown == (logged[n]["shown_class"] or logged[n]["state"].replace("_", " ").upper()), (n, shown)
    later = WebDriverWait(driver, 10).until(
        lambda d: (v := int(d.find_element(By.ID, "decision").get_attribute("data-n"))) > n and v)
    assert later > n
    shot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(shot))  # a test artifact
    assert shot.stat().st_size > 10_000


def test_the_page_in_a_browser_shows_changing_frames_and_follows_the_events(calibrated_bundle, tmp_path):
    driver = _browser()
    proc, base, log = _run_with_view(calibrated_bundle, tmp_path)
    try:
        _check_page(driver, base, log, ARTIFACTS / "live-view.png")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(30)


def test_with_a_token_and_tls_no_token_is_401_and_the_browser_logs_in_over_https(calibrated_bundle, tmp_path):
    driver = _browser(tls=True)
    cert, key = _self_signed(tmp_path)
    token = "a-test-token-of-enough-length-123"
    config = tmp_path / "device.toml"
    config.write_text(f'[serve]\ntoken = "{token}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
                      f'[security]\ntrusted_keys = "{tmp_path / "keys"}"\nstate_dir = "{tmp_path / "state"}"\n')
    proc, base, log = _run_with_view(calibrated_bundle, tmp_path, config)
    try:
        assert base.startswith("https://")
        import ssl

        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        for path in ("/", "/stream.mjpg", "/events", "/snapshot.jpg"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path, timeout=10, context=insecure)
            assert refused.value.code == 401, path
        request = urllib.request.Request(base + "/readyz", headers={"Authorization": f"Bearer {token}"})
        with pytest.raises(urllib.error.HTTPError) as no_route:  # the token passes: then the path decides (run
            urllib.request.urlopen(request, timeout=10, context=insecure)  # has no health routes)
        assert no_route.value.code == 404
        driver.get(f"{base}/login?token={token}")  # sets the session cookie and redirects to /
        _check_page(driver, base, log, ARTIFACTS / "live-view-https.png")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(30)


def test_run_refuses_a_network_view_without_token_and_tls(calibrated_bundle, tmp_path):
    """Checked before anything binds (tests never listen beyond loopback): exit 2, naming what is missing."""
    r = subprocess.run([sys.executable, "-m", "edge_pfm", "run", "--bundle", str(calibrated_bundle), "--white", CAMERA,
                        "--fluo", CAMERA, "--seconds", "1", "--view", "0.0.0.0:8080"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "token" in errors[0] and "TLS" in errors[0] and "--view" in errors[0], r.stderr
