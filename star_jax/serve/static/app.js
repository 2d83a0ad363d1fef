// The star-jax page: record or drop speech, POST it to /api/generate, play and draw what comes back.
// Recordings are decoded in the browser and sent as 16 kHz mono wav, which the server reads without ffmpeg.
"use strict";

const $ = (id) => document.getElementById(id);
const SPEECH_RATE = 16000;
let speech = null;      // {blob, name}: what the next generate sends
let recorder = null;

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// Health: "warming up" until the model is compiled; the defaults fill the option fields once.
async function pollHealth() {
  let health;
  try {
    health = await (await fetch("/api/health")).json();
  } catch (e) {
    $("status").textContent = "cannot reach the server";
    setTimeout(pollHealth, 2000);
    return;
  }
  const status = $("status");
  status.className = "status " + (health.ready ? "ready" : health.status.startsWith("failed") ? "failed" : "warming");
  status.textContent = health.ready ? "ready" : health.status.startsWith("failed") ? health.status
    : "warming up: loading and compiling the model…";
  if (health.defaults && !$("seconds").value) {
    $("seconds").value = health.defaults.seconds;
    $("steps").value = health.defaults.steps;
    $("cfg").value = health.defaults.cfg;
    $("seconds").max = health.limits.max_seconds;
  }
  updateGenerate(health.ready);
  if (!health.ready && !health.status.startsWith("failed")) setTimeout(pollHealth, 1000);
}

let serverReady = false;
function updateGenerate(ready) {
  if (ready !== undefined) serverReady = ready;
  $("generate").disabled = !(serverReady && speech);
}

// 16-bit PCM wav of mono float samples.
function encodeWav(samples, rate) {
  const view = new DataView(new ArrayBuffer(44 + 2 * samples.length));
  const text = (o, s) => { for (let i = 0; i < s.length; i++) view.setUint8(o + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * samples.length, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * samples.length, true);
  for (let i = 0; i < samples.length; i++) {
    view.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, samples[i])) * 0x7fff, true);
  }
  return new Blob([view], {type: "audio/wav"});
}

// Any audio the browser can decode -> mono Float32Array at `rate` (an OfflineAudioContext needs no sound card).
async function decodeMono(blob, rate) {
  const buffer = await new OfflineAudioContext(1, 1, rate).decodeAudioData(await blob.arrayBuffer());
  const mono = new Float32Array(buffer.length);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const data = buffer.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += data[i] / buffer.numberOfChannels;
  }
  return mono;
}

function setSpeech(blob, name) {
  speech = {blob, name};
  $("query").src = URL.createObjectURL(blob);
  $("query").hidden = false;
  $("query-name").textContent = name;
  showError("");
  updateGenerate();
  drawSpectrogram($("spec-query"), blob).catch(() => {});  // a format the browser cannot decode: the server says why
}

async function toggleRecord() {
  if (recorder) {
    recorder.stop();
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({audio: true});
  } catch (e) {
    showError("microphone unavailable (" + e.name + "); allow it, use localhost or HTTPS, or drop a file");
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    recorder = null;
    $("record").textContent = "● Record";
    $("record").classList.remove("recording");
    try {
      const samples = await decodeMono(new Blob(chunks, {type: chunks[0] ? chunks[0].type : ""}), SPEECH_RATE);
      setSpeech(encodeWav(samples, SPEECH_RATE), "recording.wav");
    } catch (e) {
      showError("could not decode the recording: " + e.message);
    }
  };
  recorder.start();
  $("record").textContent = "■ Stop";
  $("record").classList.add("recording");
}

async function generate(event) {
  event.preventDefault();
  if (!speech) return;
  const form = new FormData($("options"));
  form.append("speech", speech.blob, speech.name);
  $("generate").disabled = true;
  $("generate").textContent = "Generating…";
  showError("");
  try {
    const response = await fetch("/api/generate", {method: "POST", body: form});
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try { message = (await response.json()).error; } catch (e) { /* not JSON: keep the status line */ }
      showError(message);
      return;
    }
    const wav = await response.blob();
    const url = URL.createObjectURL(wav);
    $("result").src = url;
    $("download").href = url;
    $("download").download = "star-jax-seed" + (response.headers.get("X-Seed") || "0") + ".wav";
    $("result-box").hidden = false;
    $("timings").textContent = describeTimings(response.headers.get("Server-Timing"),
                                               response.headers.get("X-Batch-Size"));
    await drawSpectrogram($("spec-result"), wav);
  } catch (e) {
    showError("request failed: " + e.message);
  } finally {
    $("generate").textContent = "Generate";
    updateGenerate();
  }
}

function describeTimings(header, batch) {
  const ms = {};
  for (const part of (header || "").split(",")) {
    const m = part.trim().match(/^(\w+);dur=([\d.]+)/);
    if (m) ms[m[1]] = parseFloat(m[2]);
  }
  const f = (k) => (k in ms ? (ms[k] / 1000).toFixed(2) + " s" : "?");
  return `speech encoding ${f("encode")} · generation ${f("generate")} · decoding ${f("decode")} · ` +
         `queued ${f("queue")} · batch of ${batch || "?"}`;
}

// Log-magnitude STFT (512-point Hann, hop 128) drawn with time left to right, frequency bottom to top.
function fft(re, im) {
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) { [re[i], re[j]] = [re[j], re[i]]; [im[i], im[j]] = [im[j], im[i]]; }
  }
  for (let len = 2; len <= n; len <<= 1) {
    const angle = -2 * Math.PI / len;
    for (let i = 0; i < n; i += len) {
      for (let k = 0; k < len / 2; k++) {
        const wr = Math.cos(angle * k), wi = Math.sin(angle * k);
        const a = i + k, b = a + len / 2;
        const tr = re[b] * wr - im[b] * wi, ti = re[b] * wi + im[b] * wr;
        re[b] = re[a] - tr; im[b] = im[a] - ti; re[a] += tr; im[a] += ti;
      }
    }
  }
}

async function drawSpectrogram(canvas, blob) {
  const samples = await decodeMono(blob, SPEECH_RATE);
  const size = 512, hop = 128, bins = size / 2;
  const frames = Math.max(1, Math.floor((samples.length - size) / hop) + 1);
  const db = new Float32Array(frames * bins);
  let top = -Infinity;
  for (let f = 0; f < frames; f++) {
    const re = new Float32Array(size), im = new Float32Array(size);
    for (let i = 0; i < size; i++) {
      re[i] = (samples[f * hop + i] || 0) * (0.5 - 0.5 * Math.cos(2 * Math.PI * i / size));
    }
    fft(re, im);
    for (let k = 0; k < bins; k++) {
      const v = 10 * Math.log10(re[k] * re[k] + im[k] * im[k] + 1e-10);
      db[f * bins + k] = v;
      top = Math.max(top, v);
    }
  }
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(canvas.width, canvas.height);
  for (let x = 0; x < canvas.width; x++) {
    const f = Math.min(frames - 1, Math.floor(x * frames / canvas.width));
    for (let y = 0; y < canvas.height; y++) {
      const k = Math.min(bins - 1, Math.floor((canvas.height - 1 - y) * bins / canvas.height));
      const level = Math.max(0, Math.min(1, (db[f * bins + k] - top + 80) / 80));  // an 80 dB range
      const p = 4 * (y * canvas.width + x);
      image.data[p] = 255 * Math.min(1, 1.5 * level);
      image.data[p + 1] = 255 * Math.max(0, 1.5 * level - 0.5);
      image.data[p + 2] = 255 * Math.max(0, 0.6 - level);
      image.data[p + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
}

function wireDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", () => {
    if ($("file").files[0]) setSpeech($("file").files[0], $("file").files[0].name);
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) setSpeech(file, file.name);
  });
}

$("record").addEventListener("click", toggleRecord);
$("options").addEventListener("submit", generate);
wireDrop();
pollHealth();
