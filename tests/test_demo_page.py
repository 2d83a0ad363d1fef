"""The listening page opens from disk in headless Chromium: every audio source decodes to a clip of the right
length and every spectrogram image loads. The page is built from synthetic clips by the demo's own writer."""

import os
import shutil

import numpy as np
import pytest

from star_jax.demo import page as demo_page

SCRIPT_DECODE = """
const done = arguments[arguments.length - 1];
const one = (a) => new Promise((resolve) => {
  const xhr = new XMLHttpRequest();
  xhr.open('GET', a.src);
  xhr.responseType = 'arraybuffer';
  xhr.onload = () => new OfflineAudioContext(1, 1, 44100).decodeAudioData(xhr.response).then(
      (buf) => resolve({src: a.src, want: +a.dataset.seconds, decoded: buf.length / buf.sampleRate}),
      (err) => resolve({src: a.src, error: String(err)}));
  xhr.onerror = () => resolve({src: a.src, error: 'could not read the file'});
  xhr.send();
});
Promise.all([...document.querySelectorAll('audio')].map(one)).then(done);
"""

SCRIPT_MEDIA = """
const done = arguments[arguments.length - 1];
const one = (a) => new Promise((resolve) => {
  const report = () => resolve({src: a.src, duration: a.duration, error: a.error && a.error.code});
  if (a.readyState >= 1 || a.error) { report(); return; }
  a.addEventListener('loadedmetadata', report); a.addEventListener('error', report); a.load();
});
Promise.all([...document.querySelectorAll('audio')].map(one)).then(done);
"""


def _examples(n=12):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    seconds = 1.0 + 0.1 * i  # every clip its own length, so a swapped or truncated file shows
    t = np.arange(int(seconds * 8000)) / 8000
    tone = lambda f: (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32)
    out.append(dict(id=f"clip{i}", caption=f"sound <{i}> & co", rate_hz=8000, query_rate_hz=16000,
                    query=(0.1 * rng.standard_normal(int(1.5 * 16000))).astype(np.float32),
                    generated=tone(300 + 20 * i), zero=tone(200), real=tone(300 + 20 * i)[: len(t) // 2],
                    hit=bool(i % 2)))
  return out


def _driver():
  pytest.importorskip("selenium")
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  chromedriver = shutil.which("chromedriver")
  if not (chromium and chromedriver):
    pytest.skip("needs Debian's chromium and chromium-driver (make system-deps)")
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  opts = webdriver.ChromeOptions()
  opts.binary_location = chromium
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--allow-file-access-from-files"):  # the decode check reads the wavs beside the page
    opts.add_argument(flag)
  driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
  driver.set_script_timeout(60)
  return driver


def test_page_opens_in_chromium(tmp_path):
  examples = _examples()
  report_md = "# star-jax demo report\n\n## Stage 2\n\n| audio | event accuracy |\n|---|---|\n| generated | 0.500 (6) |\n"
  path = demo_page.write_page(str(tmp_path), examples, report_md)
  driver = _driver()
  try:
    driver.get("file://" + os.path.abspath(path))
    decoded = driver.execute_async_script(SCRIPT_DECODE)
    media = driver.execute_async_script(SCRIPT_MEDIA)
    images = driver.execute_script(
        "return [...document.images].map(i => ({src: i.src, ok: i.complete && i.naturalWidth > 0}));")
    tables = driver.execute_script("return [...document.querySelectorAll('table')].map(t => t.innerText);")
  finally:
    driver.quit()
  assert len(decoded) == len(media) == 4 * len(examples)
  want = [len(ex[k]) / (ex["query_rate_hz"] if k == "query" else ex["rate_hz"])
          for ex in examples for k, _ in demo_page.COLUMNS]
  for row, seconds in zip(decoded, want):
    assert "error" not in row, row
    assert row["decoded"] == pytest.approx(seconds, abs=2e-3) and row["want"] == pytest.approx(seconds, abs=1e-3)
  for row, seconds in zip(media, want):
    assert row["error"] is None and row["duration"] == pytest.approx(seconds, abs=2e-3), row
  assert len(images) == 4 * len(examples) and all(im["ok"] for im in images), images
  assert "sound <3> & co" in tables[0] and "0.500 (6)" in tables[1]


def test_pick_is_random_but_fixed():
  a, b = demo_page.pick(261, 12, seed=0), demo_page.pick(261, 12, seed=0)
  assert np.array_equal(a, b) and len(set(a)) == 12 and a.max() < 261
  assert not np.array_equal(a, np.linspace(0, 260, 12).round().astype(int))
  assert len(demo_page.pick(5, 12)) == 5
