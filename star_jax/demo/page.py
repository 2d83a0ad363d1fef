"""The demo's listening page: report.html, opened from disk with no server.

For each example (drawn at random over the test split with a fixed seed, not picked) a row of four clips — the
spoken query, the generated clip, the same model with a zero condition, the real clip — each as an <audio> player
over its log-mel spectrogram; then the report's tables. Wavs and PNGs are files beside the page (relative links).
"""

from __future__ import annotations

import html
import os
import re

import numpy as np

COLUMNS = (("query", "spoken query"), ("generated", "generated"), ("zero", "zero condition"), ("real", "real clip"))


def pick(num_items: int, count: int, seed: int = 0) -> np.ndarray:
  """`count` indices drawn at random without replacement from range(num_items) (fixed seed), sorted."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_items, size=min(count, num_items), replace=False))


def spectrogram_png(path: str, wav: np.ndarray, rate_hz: int) -> None:
  """A log-mel image of one clip (64 bands, 80 dB range, low frequencies at the bottom)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from star_jax.demo.report import log_mel_db
  db = log_mel_db(wav, rate_hz, hop=max(1, rate_hz // 100))
  image = np.repeat(np.repeat(db[::-1], 2, axis=0), 2, axis=1)  # 128 px high, 2 px per 10 ms
  plt.imsave(path, image, cmap="magma", vmin=-80.0, vmax=max(float(db.max()), -40.0))


def markdown_to_html(text: str) -> str:
  """The subset of Markdown report.md uses: headings, pipe tables, images, `code`, paragraphs."""
  out, table = [], []

  def inline(s):
    s = html.escape(s, quote=False)
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", s)

  def flush():
    if table:
      rows = [r for r in table if not re.fullmatch(r"\|[-|: ]+\|", r)]
      cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
      head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
      body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
      out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
      table.clear()

  for line in text.splitlines():
    if line.startswith("|"):
      table.append(line)
      continue
    flush()
    if m := re.match(r"(#{1,4}) (.*)", line):
      level = len(m.group(1)) + 1  # the page's own title is the h1
      out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
    elif m := re.fullmatch(r"!\[([^\]]*)\]\(([^)]*)\)", line.strip()):
      out.append(f'<p><img src="{html.escape(m.group(2))}" alt="{html.escape(m.group(1))}"></p>')
    elif line.strip():
      out.append(f"<p>{inline(line)}</p>")
  flush()
  return "\n".join(out)


def write_page(out_dir: str, examples: list[dict], report_md: str, title: str = "star-jax demo: listen") -> str:
  """Write out_dir/report.html and its media under out_dir/page/ -> the page's path.

  examples: dicts with `id`, `caption`, `rate_hz` (of the sound clips), `query_rate_hz`, the waveforms `query`,
  `generated`, `zero`, `real`, and optional `hit` (does the evaluator hear the query's event in `generated`).
  """
  from star_jax.generate import write_wav

  media = os.path.join(out_dir, "page")
  os.makedirs(media, exist_ok=True)
  rows = []
  for n, ex in enumerate(examples):
    cells = []
    for key, name in COLUMNS:
      rate = int(ex["query_rate_hz"] if key == "query" else ex["rate_hz"])
      stem = f"{n:02d}_{key}"
      write_wav(os.path.join(media, stem + ".wav"), np.asarray(ex[key], np.float32), rate)
      spectrogram_png(os.path.join(media, stem + ".png"), ex[key], rate)
      seconds = len(ex[key]) / rate
      cells.append(f'<td><div class="name">{name}</div>'
                   f'<audio controls preload="metadata" src="page/{stem}.wav" data-seconds="{seconds:.4f}"></audio>'
                   f'<br><img src="page/{stem}.png" alt="{name} spectrogram"></td>')
    verdict = "" if ex.get("hit") is None else (" — evaluator hears the event" if ex["hit"]
                                                 else " — evaluator does not hear the event")
    rows.append(f'<tr><th colspan="4">&ldquo;{html.escape(str(ex["caption"]))}&rdquo; '
                f'<span class="id">({html.escape(str(ex["id"]))}){verdict}</span></th></tr>'
                f"<tr>{''.join(cells)}</tr>")
  page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
.examples td {{ width: 25%; }} .examples img {{ width: 100%; height: 96px; }} .examples audio {{ width: 100%; }}
.name {{ font-weight: bold; }} .id {{ font-weight: normal; color: #666; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(examples)} held-out spoken queries drawn at random (fixed seed) over the test split. Each row: the query
as spoken (a voice never heard in training), the clip generated for it, the same model with a zero condition,
and the real clip of that caption. Spectrograms: log-mel, 80 dB range, time left to right.</p>
<table class="examples">{''.join(rows)}</table>
{markdown_to_html(report_md)}
</body></html>
"""
  path = os.path.join(out_dir, "report.html")
  with open(path, "w") as f:
    f.write(page)
  return path
