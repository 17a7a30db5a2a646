"""The eval's gallery: RUN_DIR/eval/gallery.html, one self-contained page to watch what fine-tuning changed.

Per suite and dimension, every (prompt, sample) pair plays the baseline's and the fine-tuned model's
video side by side (looping, muted, from the saved mp4s by relative path), with the prompt, the
verification question, both rewards, their difference and the pair's drift statistics. Within a
dimension the largest gains come first, then, in their own list, the largest losses. The top of the
page has the per-dimension summary with intervals, the realism distance and the protocol. A video
loads only when it scrolls into view (preload="none" and a few lines of script), so a page of thousands
of videos opens at once; each dimension is a <details> section that opens on its own.
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from gigavideo.eval.report import DRIFT_KEYS, LABELS
from gigavideo.rundir.files import write_atomic

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.pair { display: flex; gap: 1em; align-items: flex-start; border-top: 1px solid #ddd; padding: 0.6em 0; }
.pair video { width: 256px; image-rendering: pixelated; background: #000; }
.pair figure { margin: 0; text-align: center; font-size: 0.85em; }
.meta { max-width: 40em; font-size: 0.9em; }
.gain { color: #1a7f37; } .loss { color: #b42318; }
summary { font-size: 1.15em; cursor: pointer; margin: 0.4em 0; }
"""
# Load and play a video only when it is on screen; pause it when it leaves.
SCRIPT = """
const seen = new IntersectionObserver(entries => entries.forEach(e => {
  if (e.isIntersecting) { e.target.preload = "auto"; e.target.play().catch(() => {}); } else { e.target.pause(); }
}), {rootMargin: "200px"});
document.querySelectorAll("video").forEach(v => {
  seen.observe(v);
  v.addEventListener("loadedmetadata", () => { v.dataset.state = "loaded"; });
  v.addEventListener("error", () => {
    v.dataset.state = "error";
    const link = '<a href="' + v.getAttribute("src") + '">this browser cannot play it: open the file</a>';
    v.insertAdjacentHTML("afterend", "<br>" + link);
  });
});
"""


def _interval(result: dict) -> str:
    if "difference" not in result:
        return "-"
    return f"{result['difference']:+.4f} [{result['ci_low']:+.4f}, {result['ci_high']:+.4f}]"


def _summary(report: dict) -> list[str]:
    rows = ["<table><tr><th>suite</th><th>dimension</th><th>pairs</th><th>baseline</th><th>fine-tuned</th>"]
    rows[0] += "<th>difference [95% interval]</th></tr>"
    for suite, body in report["suites"].items():
        for name, r in body["dimensions"].items():
            cells = [suite, f'<a href="#{suite}-{name}">{name}</a>', str(r.get("n", 0))]
            cells += [f"{r[label]:.4f}" if label in r else "-" for label in LABELS] + [_interval(r)]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    rows.append("</table>")
    for suite, body in report["suites"].items():
        r = body.get("realism") or {}
        if r.get("videos"):
            rows.append(
                f"<p>{suite}: realism distance to {body['realism_reference']} real clips (lower is closer): "
                f"baseline {r['baseline']:.3f}, fine-tuned {r['finetuned']:.3f} "
                f"({100 * r.get('relative_change', 0):+.1f}%).</p>"
            )
    protocol = "\n".join(f"{k}: {v}" for k, v in report["protocol"].items())
    rows.append(f"<details><summary>Protocol</summary><pre>{html.escape(protocol)}</pre></details>")
    return rows


def _pair(video: dict, records: dict, difference: float) -> str:
    base, tuned = (records[(label, video["key"])] for label in LABELS)
    sources = [quote(f"videos/{label}/{video['path']}") for label in LABELS]
    figures = "".join(
        f'<figure><video src="{src}" preload="none" muted loop playsinline></video>'
        f"<figcaption>{label} {record['reward']:.3f}</figcaption></figure>"
        for src, label, record in zip(sources, ("baseline", "fine-tuned"), (base, tuned), strict=True)
    )
    drift = ", ".join(
        f"{k} {base['stats'][k]:.3g} &rarr; {tuned['stats'][k]:.3g}"
        for k in DRIFT_KEYS
        if base.get("stats") and tuned.get("stats")
    )
    questions = video.get("questions") or [video.get("question", "")]
    return (
        f'<div class="pair" data-key="{html.escape(video["key"])}" data-difference="{difference:.6f}">{figures}'
        f'<div class="meta"><p><b>{html.escape(video["prompt"])}</b> (sample {video["index"]})</p>'
        + "".join(f"<p>Q: {html.escape(q)}</p>" for q in questions if q)
        + f'<p class="{"gain" if difference > 0 else "loss" if difference < 0 else ""}">difference '
        f"{difference:+.3f}</p><p>drift: {drift or '-'}</p></div></div>"
    )


def write_gallery(report: dict, videos: list[dict], records: dict, out_dir: Path) -> Path:
    """out_dir/gallery.html (out_dir: the eval folder, which holds videos/{baseline,finetuned}/...)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>GigaVideo-1 eval gallery</title>",
        f"<style>{STYLE}</style></head><body><h1>GigaVideo-1 eval: baseline vs fine-tuned</h1>",
        f"<p>Judge: <code>{html.escape(str(report['judge']))}</code>. Each pair: the same prompt and seed, "
        "baseline left, fine-tuned right.</p>",
        *_summary(report),
    ]
    for suite, body in report["suites"].items():
        parts.append(f"<h2>Suite {html.escape(suite)}</h2>")
        for n, name in enumerate(body["dimensions"]):
            scored = [
                v
                for v in videos
                if v["suite"] == suite
                and v["dimension"] == name
                and all(records[(label, v["key"])].get("reward") is not None for label in LABELS)
            ]
            gain = {
                v["key"]: records[("finetuned", v["key"])]["reward"] - records[("baseline", v["key"])]["reward"]
                for v in scored
            }
            gains = sorted((v for v in scored if gain[v["key"]] >= 0), key=lambda v: -gain[v["key"]])
            losses = sorted((v for v in scored if gain[v["key"]] < 0), key=lambda v: gain[v["key"]])
            result = body["dimensions"][name]
            parts.append(
                f'<details id="{suite}-{name}"{" open" if n == 0 else ""}><summary>{html.escape(name)}: '
                f"{_interval(result)} ({len(scored)} pairs)</summary>"
                f"<h3>Gains, largest first ({len(gains)})</h3>"
                + "".join(_pair(v, records, gain[v["key"]]) for v in gains)
                + f"<h3>Losses, largest first ({len(losses)})</h3>"
                + "".join(_pair(v, records, gain[v["key"]]) for v in losses)
                + "</details>"
            )
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return write_atomic(out_dir / "gallery.html", lambda tmp: tmp.write_text("\n".join(parts)))
