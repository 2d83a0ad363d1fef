"""`star-jax serve` on a tiny random bundle, over real HTTP on 127.0.0.1: every bad input gets its 4xx and the
server stays up, a full queue gets 503, a headless Chromium records from a fake microphone and plays the
result, and 32 concurrent requests are all answered in batches."""

import argparse
import base64
import concurrent.futures
import io
import shutil
import subprocess
import threading
import time

import jax
import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
portpicker = pytest.importorskip("portpicker")

from star_jax.checkpoint import save_params  # noqa: E402
from star_jax.config import load_config  # noqa: E402
from star_jax.generate import fit_to_pcm  # noqa: E402
from star_jax.serve import build  # noqa: E402
from star_jax.serve.app import Limits, create_app  # noqa: E402
from star_jax.serve.batcher import Batcher  # noqa: E402
from star_jax.train.stage import build_stage  # noqa: E402

RATE = 16000
MAX_BATCH = 4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  """Tiny random weights (shapes from `jax.eval_shape`, filled in numpy: no init compile) saved as a bundle."""
  cfg = load_config("configs/star.py:tiny", ["dit.depth=2", "hubert.num_layers=1", "flow.num_steps=2",
                                              "data.audio_duration_s=1.0"])
  shapes = jax.eval_shape(build_stage(cfg, "stage2").init, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    value = getattr(leaf, "value", leaf)  # boxed (logically partitioned) leaves
    if name == "bias":
      return np.zeros(value.shape, value.dtype)
    if name in ("scale", "alpha", "beta"):
      return np.ones(value.shape, value.dtype)
    return (0.02 * rng.standard_normal(value.shape)).astype(value.dtype)

  tree = jax.tree_util.tree_map_with_path(fill, shapes, is_leaf=lambda x: hasattr(x, "value"))
  parts = {**tree["frozen"], "dit": tree["params"]["dit"],
           "bridge": {**tree["frozen"]["bridge"], **tree["params"]["bridge"]}}
  return save_params(str(tmp_path_factory.mktemp("serve") / "bundle"), parts, cfg, kind="bundle")


class Server:
  """An app under uvicorn in a thread of this process, ready (model compiled) when constructed."""

  def __init__(self, app, batcher, wait_ready: bool = True):
    self.batcher, self.port = batcher, portpicker.pick_unused_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
    self._thread = threading.Thread(target=self._server.run, daemon=True)
    self._thread.start()
    deadline = time.time() + 600
    while not (self._server.started and (batcher.ready or not wait_ready)):
      assert time.time() < deadline and not batcher.state.startswith("failed"), batcher.state
      time.sleep(0.2)

  def health(self) -> dict:
    return httpx.get(self.url + "/api/health", timeout=120).json()

  def stop(self):
    self._server.should_exit = True
    self._thread.join(30)


@pytest.fixture(scope="module")
def server(bundle):
  args = argparse.Namespace(ckpt=bundle, host="127.0.0.1", port=0, max_batch=MAX_BATCH, max_queue=64,
                            window_ms=100.0, max_upload_mb=2.0, max_speech_seconds=10.0, max_seconds=5.0)
  s = Server(*build(args))
  yield s
  s.stop()


def _wav(seconds=1.0, rate=RATE, channels=1, freq=220.0, subtype="PCM_16", fill=None) -> bytes:
  t = np.arange(int(seconds * rate)) / rate
  wave = 0.3 * np.sin(2 * np.pi * freq * t) if fill is None else np.full(t.shape, fill)
  buf = io.BytesIO()
  sf.write(buf, (wave[:, None] * np.ones((1, channels))).astype(np.float32), rate, subtype=subtype, format="WAV")
  return buf.getvalue()


def _post(url, speech: bytes | None, name="in.wav", timeout=300, **fields):
  files = None if speech is None else {"speech": (name, speech, "audio/wav")}
  return httpx.post(url + "/api/generate", files=files, data={k: str(v) for k, v in fields.items()},
                    timeout=timeout)


BAD = {  # case -> (upload, form fields, status, words the error must hold)
    "not_audio": (np.random.default_rng(0).bytes(4096), {}, 400, "in.wav: unreadable"),
    "empty": (b"", {}, 400, "in.wav: unreadable: empty file"),
    "zero_length": (_wav(0.0), {}, 400, "too short or empty"),
    "silent": (_wav(fill=0.0), {}, 400, "in.wav: the recording is silent"),
    "nan": (_wav(fill=np.nan, subtype="FLOAT"), {}, 400, "non-finite samples"),
    "too_long": (_wav(11.0, rate=8000), {}, 400, "longer than 10 s"),
    "too_large": (b"\0" * (3 << 20), {}, 413, "larger than 2 MiB"),
    "no_file": (None, {"seconds": 1}, 400, "`speech` file"),
    "seconds_zero": (_wav(), {"seconds": 0}, 400, "seconds 0: choose a value above 0 up to 5 s"),
    "seconds_huge": (_wav(), {"seconds": 999}, 400, "seconds 999"),
    "seconds_nan": (_wav(), {"seconds": "nan"}, 400, "seconds nan"),
    "seconds_text": (_wav(), {"seconds": "ten"}, 400, "seconds 'ten': not a number"),
    "steps_zero": (_wav(), {"steps": 0}, 400, "steps 0"),
    "steps_float": (_wav(), {"steps": 2.5}, 400, "steps '2.5': not an integer"),
    "cfg_negative": (_wav(), {"cfg": -1}, 400, "cfg -1"),
    "seed_negative": (_wav(), {"seed": -3}, 400, "seed -3"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_4xx_and_the_server_stays_up(case, server):
  speech, fields, status, words = BAD[case]
  r = _post(server.url, speech, **fields)
  assert r.status_code == status, r.text
  assert r.headers["content-type"] == "application/json"
  error = r.json()["error"]
  assert words in error and "\n" not in error and "/tmp" not in error
  health = server.health()
  assert health["ready"] and health["requests_failed"] == 0


def test_multichannel_96k_input_gets_the_wav_a_lone_generate_gives(server):
  """8 channels at 96 kHz are mixed down and resampled; the served sound is what `Generator` gives for that
  speech and seed on its own, so the request path adds nothing and loses nothing."""
  upload = _wav(0.7, rate=96000, channels=8, freq=330.0)
  r = _post(server.url, upload, name="eight.wav", seconds=0.5, seed=7, cfg=2.0)
  assert r.status_code == 200, r.text
  assert r.headers["content-type"] == "audio/wav" and r.headers["x-batch-size"] == "1"
  timings = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
  assert set(timings) == {"encode", "generate", "decode", "queue"} and float(timings["generate"]) > 0
  wav, rate = sf.read(io.BytesIO(r.content), dtype="float32")
  assert rate == RATE and wav.shape == (8000,)

  want = _alone(server, upload, seconds=0.5, seed=7, cfg=2.0)
  assert np.abs(want).max() > 10 * 2 / 32767  # well above the 16-bit tolerance of the comparison
  np.testing.assert_allclose(wav, fit_to_pcm(want), atol=2 / 32767)


def _alone(server, upload: bytes, *, seconds, seed, cfg):
  """What the server's model gives for this upload alone, called directly through the same two programs the
  server times apart (`latents`, then `decode`; `sample` fuses them, which moves the last bits)."""
  from star_jax.serve.app import _read_upload
  gen = server.batcher.gen
  tokens = gen.tokens([_read_upload(upload, "q.wav", 60.0)])
  return gen.decode(gen.latents(tokens, seconds, cfg_scale=cfg, seed=seed), seconds)[0]


def test_requests_wait_for_the_model_with_503_while_it_loads(server):
  """Until the model is loaded and compiled, the page and /api/health answer and say so; generate is a 503."""
  loaded = threading.Event()
  batcher = Batcher(lambda: loaded.wait(60) and server.batcher.gen, max_batch=1)
  s = Server(create_app(batcher, Limits()), batcher, wait_ready=False)
  try:
    assert s.health()["status"] == "loading" and not s.health()["model_loaded"]
    assert all(httpx.get(s.url + p, timeout=120).status_code == 200 for p in ("/", "/static/app.js"))
    r = _post(s.url, _wav())
    assert r.status_code == 503 and r.headers["retry-after"] == "5" and "loading" in r.json()["error"]
    loaded.set()
    deadline = time.time() + 120
    while not s.health()["ready"]:
      assert time.time() < deadline
      time.sleep(0.1)
    assert _post(s.url, _wav()).status_code == 200
  finally:
    loaded.set()
    s.stop()


def test_full_queue_gets_503_with_retry_after(server, monkeypatch):
  """A second app on the same loaded model with room for one waiting request: while the worker is held inside
  a call, one request waits and the next is refused. The waiting one is then cancelled (its client gone): the
  worker skips it and serves on."""
  from star_jax.serve.app import _read_upload

  gen = server.batcher.gen
  entered, release = threading.Event(), threading.Event()
  tokens = gen.tokens

  def held_tokens(speech):
    entered.set()
    assert release.wait(60)
    return tokens(speech)

  small = Batcher(lambda: gen, max_batch=1, max_queue=1, window_s=0.0)
  s = Server(create_app(small, Limits()), small)
  try:
    monkeypatch.setattr(gen, "tokens", held_tokens)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      first = pool.submit(_post, s.url, _wav())
      assert entered.wait(60)
      waiting = small.submit(_read_upload(_wav(freq=440.0), "q.wav", 60.0), small.defaults)
      assert s.health()["queue_depth"] == 1
      refused = _post(s.url, _wav(freq=550.0))
      assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
      assert "queue is full" in refused.json()["error"]
      assert waiting.cancel()
      release.set()
      assert first.result().status_code == 200
    assert _post(s.url, _wav(freq=660.0)).status_code == 200
    assert s.health()["requests_served"] == 2 and s.health()["queue_depth"] == 0
  finally:
    release.set()
    s.stop()


def test_load_32_concurrent_requests_are_all_answered_in_batches(server, capsys):
  """32 requests at once, each its own speech and seed: all answered with a wav, none lost, some batched; the
  rows of a batch are each request's own (three checked against a lone run of their speech and seed)."""
  before = server.health()
  uploads = [_wav(1.0, freq=200.0 + 25 * i) for i in range(32)]

  def one(i):
    t0 = time.perf_counter()
    r = _post(server.url, uploads[i], name=f"q{i}.wav", seed=100 + i, timeout=600)
    return i, r, time.perf_counter() - t0

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    answers = list(pool.map(one, range(32)))
  wall = time.perf_counter() - t0
  after = server.health()
  assert [r.status_code for _, r, _ in answers] == [200] * 32
  wavs = {i: sf.read(io.BytesIO(r.content), dtype="float32")[0] for i, r, _ in answers}
  assert all(w.shape == (RATE,) for w in wavs.values())  # the default 1 s
  assert after["requests_served"] - before["requests_served"] == 32
  assert after["batches_of_2_or_more"] > before["batches_of_2_or_more"]
  assert after["queue_depth"] == 0 and after["requests_failed"] == 0

  for i in (0, 13, 31):
    want = _alone(server, uploads[i], seconds=1.0, seed=100 + i, cfg=None)
    # A batch of 4 rounds differently from a batch of 1, and the tiny mel codec's Griffin-Lim (momentum 0.99)
    # grows that to ~1e-2 at a few samples; a row that took another row's noise or tokens would not correlate.
    assert np.corrcoef(wavs[i], fit_to_pcm(want))[0, 1] > 0.99
    assert np.mean(np.abs(wavs[i] - fit_to_pcm(want))) < 1e-3

  latency = np.array([t for _, _, t in answers])
  sizes = {k: n - before["batch_sizes"].get(k, 0) for k, n in after["batch_sizes"].items()
           if n > before["batch_sizes"].get(k, 0)}
  with capsys.disabled():
    print(f"\nserve load test: 32 concurrent requests in {wall:.1f} s; latency p50 {np.percentile(latency, 50):.2f} s, "
          f"p95 {np.percentile(latency, 95):.2f} s; batches by size {sizes} (max {MAX_BATCH})")


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver") and shutil.which("espeak-ng")),
                    reason="needs chromium, chromium-driver and espeak-ng (make setup installs them)")
def test_browser_records_from_a_fake_microphone_and_plays_the_sound(server, tmp_path):
  webdriver = pytest.importorskip("selenium.webdriver")
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  spoken = tmp_path / "spoken.wav"
  subprocess.run(["espeak-ng", "-w", str(spoken), "a dog barks while birds chirp"], check=True)
  opts = webdriver.ChromeOptions()
  opts.binary_location = shutil.which("chromium")
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream",
               "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={spoken}",
               "--window-size=1100,900"):
    opts.add_argument(flag)
  driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(shutil.which("chromedriver")))
  try:
    wait = WebDriverWait(driver, 120)
    driver.get(server.url)
    wait.until(lambda d: d.find_element(By.ID, "status").text == "ready")
    driver.find_element(By.ID, "record").click()
    time.sleep(2.5)
    driver.find_element(By.ID, "record").click()
    wait.until(lambda d: d.find_element(By.ID, "query-name").text == "recording.wav")
    seconds = driver.find_element(By.ID, "seconds")
    seconds.clear()
    seconds.send_keys("0.5")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "result").get_attribute("src").startswith("blob:")
               or d.find_element(By.ID, "error").is_displayed())
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text
    assert "generation" in driver.find_element(By.ID, "timings").text
    assert driver.find_element(By.ID, "download").get_attribute("href").startswith("blob:")
    encoded = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('result').src).then(r => r.arrayBuffer()).then(buf => {
          let s = ''; new Uint8Array(buf).forEach(b => s += String.fromCharCode(b)); done(btoa(s)); });""")
    wav, rate = sf.read(io.BytesIO(base64.b64decode(encoded)), dtype="float32")
    assert rate == RATE and wav.shape == (int(0.5 * RATE),)
    time.sleep(0.5)  # the spectrogram is drawn after the player gets its source
    shot = tmp_path / "page.png"
    driver.save_screenshot(str(shot))

    seconds.clear()
    seconds.send_keys("999")  # the server's check and words, not the browser's
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert driver.find_element(By.ID, "error").text == "seconds 999: choose a value above 0 up to 5 s"
  finally:
    driver.quit()
  png = shot.read_bytes()
  width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and width >= 800 and height >= 600 and len(png) > 20_000
