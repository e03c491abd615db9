"""`report.html` in a real browser: headless Chromium opens it offline, every inline picture
loads, nothing goes to the console, and the screenshot is not blank.

Chromium comes from the OS (Debian: `apt-get install -y chromium`); where it is absent (CI), the
test skips, saying so. The made-up report is test_report_page.py's."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unit.test_report_page import made_up  # noqa: F401  (the fixture: tiny models, a tiny shard set)
from weatherkd.commands import report

pytestmark = pytest.mark.browser
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

# Added to a copy of the page (the report itself has no script): it says how many pictures loaded.
PROBE = """<script>window.addEventListener("load", () => {
  const images = Array.from(document.images);
  for (const img of images) if (!img.complete || img.naturalWidth === 0) console.error("WKD image failed: " + img.alt);
  console.log("WKD probe: " + images.length + " images, " + images.filter(i => i.naturalWidth > 0).length + " loaded");
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install -y chromium)")
def test_report_html_renders_in_headless_chromium(made_up, tmp_path):  # noqa: F811
    _, table = made_up
    report.write(table, report.document(table), tmp_path / "report.md")
    page = tmp_path / "probed.html"
    page.write_text((tmp_path / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    shot = tmp_path / "screenshot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                           "--window-size=1400,2400", "--virtual-time-budget=10000", f"--screenshot={shot}",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-3000:]
    probe = [ln for ln in console if "WKD probe" in ln]
    n_images = (tmp_path / "report.html").read_text().count("<img ")
    assert probe and f"{n_images} images, {n_images} loaded" in probe[0], console
    assert console == probe, console  # no console errors, no failed picture
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text, tables and figures, not a blank page
    # for a person to look at: pytest --basetemp=DIR keeps it
    assert Path(shot).stat().st_size > 50_000
