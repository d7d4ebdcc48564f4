"""Pictures and summaries of InspectAttention answers: a PNG grid of heatmaps, a self-contained HTML page, text.

Pure functions of plain data (token labels and [T, T] arrays), no protobuf and no
network; matplotlib is imported only when a PNG is drawn, so the serving image
does not need it.

Head kinds, from each head's average share over query positions q >= 2 (where
the earliest token, the previous token and the token itself are three different
keys): more than half on key 0 is a "first-token head" (often a resting place
when nothing else matches), on key q-1 a "previous-token head", on key q a
"self head"; otherwise "mixed".
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

KIND_THRESHOLD = 0.5
PNG_GRID_KEY = "attnserve:grid"  # PNG text chunk: "ROWSxCOLS" of the heatmap grid


@dataclass(frozen=True)
class HeadPicture:
    layer: int
    head: int
    probabilities: np.ndarray  # float32 [T, T]
    entropy: np.ndarray  # float32 [T]


@dataclass(frozen=True)
class HeadSummary:
    layer: int
    head: int
    first: float  # average share of attention on the earliest token
    previous: float  # on the token just before
    itself: float  # on the query token itself
    mean_entropy: float  # nats

    @property
    def kind(self) -> str:
        shares = {"first-token": self.first, "previous-token": self.previous, "self": self.itself}
        name, share = max(shares.items(), key=lambda item: item[1])
        return f"{name} head" if share > KIND_THRESHOLD else "mixed"


def label(text: str) -> str:
    """A token as a short, visible label: spaces and line breaks shown, long tokens cut."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")
    return shown if len(shown) <= 12 else shown[:11] + "\u2026"


def summarize(head: HeadPicture) -> HeadSummary:
    p = head.probabilities
    T = p.shape[0]
    queries = np.arange(2, T) if T >= 3 else np.arange(T)
    previous = p[queries, queries - 1].mean() if T >= 2 else 0.0
    return HeadSummary(head.layer, head.head, first=float(p[queries, 0].mean()), previous=float(previous),
                       itself=float(p[queries, queries].mean()), mean_entropy=float(head.entropy.mean()))


def summary_text(heads: Sequence[HeadPicture]) -> str:
    lines = [f"{'layer':>5} {'head':>4}  {'first':>5} {'prev':>5} {'self':>5}  {'entropy':>7}  kind"]
    for s in map(summarize, heads):
        lines.append(f"{s.layer:>5} {s.head:>4}  {s.first:5.2f} {s.previous:5.2f} {s.itself:5.2f}  "
                     f"{s.mean_entropy:7.2f}  {s.kind}")
    kinds = [summarize(h).kind for h in heads]
    counted = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds)))
    lines.append(f"{len(heads)} heads: {counted} (shares averaged over query positions from 2 on; entropy in nats)")
    return "\n".join(lines)


def grid_shape(heads: Sequence[HeadPicture]) -> tuple[int, int]:
    """(rows, columns): one row per layer, one column per head."""
    return len({h.layer for h in heads}), len({h.head for h in heads})


def render_png(path: Path, tokens: Sequence[str], heads: Sequence[HeadPicture], title: str = "") -> tuple[int, int]:
    """Draw the heads as a grid of heatmaps (one large one, with every token labelled, for a single head);
    returns the grid shape, also stored in the PNG's PNG_GRID_KEY text chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid_shape(heads)
    layers = sorted({h.layer for h in heads})
    head_ids = sorted({h.head for h in heads})
    labels = [label(t) for t in tokens]
    T = len(tokens)
    single = rows == cols == 1
    cell = max(4.0, 0.28 * T) if single else (2.0 if T <= 24 else 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1.5, rows * cell + 1.0), squeeze=False,
                             layout="constrained")
    by_position = {(h.layer, h.head): h for h in heads}
    image = None
    for r, layer in enumerate(layers):
        for c, head in enumerate(head_ids):
            ax = axes[r][c]
            picture = by_position.get((layer, head))
            ax.set_xticks([])
            ax.set_yticks([])
            if picture is None:
                ax.axis("off")
                continue
            image = ax.imshow(picture.probabilities, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"L{layer} H{head}", fontsize=9 if not single else 12)
            # Token labels where they stay readable: every heatmap of one head, the grid's edges otherwise.
            if single or (T <= 24 and c == 0):
                ax.set_yticks(range(T), labels, fontsize=7 if not single else 9)
            if single or (T <= 24 and r == rows - 1):
                ax.set_xticks(range(T), labels, rotation=90, fontsize=7 if not single else 9)
    if single:
        axes[0][0].set_xlabel("key (attended to)")
        axes[0][0].set_ylabel("query (attending)")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6 if single else 0.3, label="attention probability")
    fig.suptitle(title or f"attention, {T} tokens; rows: query, columns: key", fontsize=11)
    fig.savefig(path, dpi=80 if not single else 100, metadata={PNG_GRID_KEY: f"{rows}x{cols}"})
    plt.close(fig)
    return rows, cols


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.3em; }}
#tokens span, .row span {{ display: inline-block; padding: 2px 3px; margin: 1px; border-radius: 3px;
  font-family: monospace; white-space: pre; }}
#tokens span {{ background: #eee; cursor: pointer; }}
#tokens span.query {{ outline: 2px solid #d33; }}
.row {{ margin: 2px 0; }}
.row .name {{ display: inline-block; width: 6em; font-size: 0.8em; color: #555; }}
#status {{ color: #555; font-size: 0.9em; }}
</style></head>
<body>
<h1>{title}</h1>
<p>Hover over a token: each row shows how one head's attention from that token spreads over the tokens
before it (darker = more). <span id="status"></span></p>
<div id="tokens"></div>
<div id="heads"></div>
<script id="attention-data" type="application/json">{data}</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("attention-data").textContent);
const tokenStrip = document.getElementById("tokens");
const headRows = document.getElementById("heads");
const cells = [];
data.labels.forEach((text, position) => {{
  const span = document.createElement("span");
  span.textContent = text;
  span.className = "token";
  span.dataset.position = position;
  span.addEventListener("mouseenter", () => show(position));
  tokenStrip.appendChild(span);
}});
data.heads.forEach((head) => {{
  const row = document.createElement("div");
  row.className = "row";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = "L" + head.layer + " H" + head.head;
  row.appendChild(name);
  const rowCells = data.labels.map((text) => {{
    const span = document.createElement("span");
    span.textContent = text;
    row.appendChild(span);
    return span;
  }});
  cells.push(rowCells);
  headRows.appendChild(row);
}});
function show(query) {{
  tokenStrip.querySelectorAll("span").forEach((span, i) => span.classList.toggle("query", i === query));
  data.heads.forEach((head, h) => {{
    const weights = head.p[query];
    cells[h].forEach((span, key) => {{
      const w = key < weights.length ? weights[key] : 0;
      span.style.background = "rgba(40, 80, 200, " + w + ")";
      span.style.color = w > 0.5 ? "#fff" : "#222";
      span.title = "L" + head.layer + " H" + head.head + ": " + (100 * w).toFixed(1) + "%";
    }});
  }});
  document.getElementById("status").textContent = "query: token " + query + " " + JSON.stringify(data.labels[query]);
}}
// The last token at first; `page.html#q=3` starts on token 3 (links, and checks without a mouse).
const asked = /q=([0-9]+)/.exec(location.hash);
show(asked && Number(asked[1]) < data.labels.length ? Number(asked[1]) : data.labels.length - 1);
document.body.dataset.rendered = "yes";
</script>
</body></html>
"""


def render_html(path: Path, tokens: Sequence[str], heads: Sequence[HeadPicture], title: str = "attention") -> None:
    """A self-contained page (inline data, CSS and JavaScript; nothing fetched at view time)."""
    data = {
        "labels": list(tokens),
        # Row q keeps its causal part only (keys 0..q), to 4 decimals: a third of the size, nothing lost to the eye.
        "heads": [{"layer": h.layer, "head": h.head,
                   "p": [[round(float(w), 4) for w in h.probabilities[q, :q + 1]] for q in range(len(tokens))]}
                  for h in heads],
    }
    # "</" inside the JSON would end the script element early.
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    Path(path).write_text(_PAGE.format(title=html.escape(title), data=payload), encoding="utf-8")
