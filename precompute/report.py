"""The static HTML evaluation report of a bundle (``conceptlens report BUNDLE [--out DIR]``).

Layout of the report directory (self-contained and relocatable: every link is relative, every
image is a copy, no network; the only JavaScript is the index's small inline script)::

    REPORT/
      index.html             method and model, then one compact row per class (no images), in order of
                             held-out ICE fidelity (lower is better), flagged classes marked with their
                             flags; an inline script adds search (name or id), sorting (name, id,
                             fidelity, stitched test, k, images) and filters (flags, stitched test), also
                             driven by the URL: index.html#q=dog&sort=name&dir=desc&flag=any&st=fail
                             (or ?q=...). Without JavaScript it is the plain table.
      class-<id>.html        one page per class: flags, the metrics (held-out and train side by
                             side), deletion/insertion curves (inline SVG) with C-Del / C-Ins of
                             both concept orders (mean contribution, Sobol total order), the
                             stitched-prototype and hyperplane-shift tests, each concept's weight,
                             contribution, Sobol importance and prototype crops, example images
                             with each concept's heatmap over them
      style.css
      img/<id>/...           copied prototype crops (JPEG) and rendered example overlays (JPEG)
      .conceptlens-report    marker: this directory is a report and may be replaced by the next one

The whole directory is written into a temporary sibling and then renamed into place, so a reader
never sees a half-written report; an existing report at the destination is replaced, any other
non-empty directory there is left alone (ReportError).

Metrics are rendered generically: whatever scalar keys ``metrics["held_out"]`` and
``metrics["train"]`` hold become table rows, list-valued curves become plots, ``stitched`` and
``shift`` get their own tables, any other key is shown as a key/value table. Absent keys are
skipped. torch-free: numpy, Pillow and the standard library only.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from ..service.bundle import Bundle, BundleError, load_bundle, staged_dir
from ..service.html import overlay_image

MARKER = ".conceptlens-report"
SPLITS = ("held_out", "train")
SPLIT_TITLES = {"held_out": "held-out", "train": "train"}

# Known metric keys: (label, hint). Unknown keys are shown by name.
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "ice_fidelity": ("ICE fidelity (relative L1 of the class logit)", "lower is better"),
    "top1_agreement": ("top-1 agreement, true vs reconstructed", "higher is better"),
    "accuracy_reconstructed": ("accuracy on reconstructed activations", "higher is better"),
    "recon_error": ("reconstruction error (relative L2)", "lower is better"),
    "c_del": ("concept deletion (C-Del)", "higher is better"),
    "c_ins": ("concept insertion (C-Ins)", "higher is better"),
    "c_del_contribution": ("C-Del, concepts by mean contribution", "higher is better"),
    "c_del_sobol": ("C-Del, concepts by Sobol importance", "higher is better"),
    "gini": ("Gini sparsity", ""),
    "importance_kind": ("concept order of C-Del, C-Ins, Gini and the curves", ""),
    "sparsity": ("sparsity", ""),
    "stability": ("stability across folds", "higher is better"),
    "identity_max_error": ("max error of the logit identity", "lower is better"),
    "images": ("images", ""),
}
METRIC_ORDER = list(METRIC_LABELS)
CURVES = {"deletion_curve": ("deletion", "#c0392b"), "insertion_curve": ("insertion", "#2471a3")}
# Concept orderings of the deletion / insertion test (precompute/checks.py): by mean contribution and
# by CRAFT's Sobol total-order importance. Their per-ordering keys get a table of their own.
ORDERINGS = {"contribution": "mean contribution", "sobol": "Sobol total order"}
ORDERING_KEYS = tuple(f"{m}_{o}" for o in ORDERINGS for m in ("c_del", "c_ins", "gini", "deletion_curve",
                                                              "insertion_curve")) + \
    tuple(f"{o}_importance" for o in ORDERINGS)
# Columns of the index beyond the fixed ones, shown when any class has them (held-out split); C-Del of
# both orderings where the bundle has them, else C-Del of the one ordering it has.
INDEX_OPTIONAL = {"accuracy_reconstructed": "accuracy<br>recon.", "c_del": "C-Del",
                  "c_del_contribution": "C-Del<br>contrib.", "c_del_sobol": "C-Del<br>Sobol",
                  "c_ins": "C-Ins", "gini": "Gini", "stability": "stability"}

CSS = """tr.chosen td { font-weight: bold; }
\
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
a{color:#1a5fb4}code{background:#f4f4f4;padding:0 .25em}
table{border-collapse:collapse;margin:.5em 0}
td,th{padding:.3em .7em;border-bottom:1px solid #e2e2e2;text-align:right;vertical-align:middle}
th{background:#f4f4f4;font-weight:600}td.l,th.l{text-align:left}
tr.flagged td{background:#fff4e0}
.flag{display:inline-block;background:#fdebd0;color:#8a4b00;border:1px solid #e0a050;border-radius:3px;
padding:0 .35em;margin:0 .15em;font-size:.85em}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.5em .9em;margin:.6em 0}
.pass{color:#1e7b34;font-weight:600}.fail{color:#b03a2e;font-weight:600}
.muted{color:#777}.small{font-size:.85em}
dl.info{display:grid;grid-template-columns:max-content auto;gap:.15em 1em;margin:.4em 0}
dl.info dt{color:#555}dl.info dd{margin:0}
.protos figure,.examples figure{display:inline-block;margin:0 .35em .35em 0;text-align:center}
.protos img{height:84px;width:84px;object-fit:cover;border:1px solid #ccc;display:block}
.examples img{width:112px;height:112px;border:1px solid #ccc;display:block}
figcaption{font-size:.75em;color:#555}
.bar{display:inline-block;height:10px;vertical-align:middle}.pos{background:#3a7}.neg{background:#c44}
.plots svg{margin-right:1em;border:1px solid #eee;max-width:100%;height:auto}
.scroll{overflow-x:auto}table.classes td{white-space:nowrap}table.classes td.flags{white-space:normal;min-width:12em}table.classes th{font-size:.9em}
nav{margin:.4em 0 1em}nav a{margin-right:1em}
.controls{display:flex;flex-wrap:wrap;gap:.5em 1.2em;align-items:center;margin:.6em 0;padding:.5em .8em;
background:#f7f7f7;border:1px solid #e2e2e2}.controls label{white-space:nowrap}
.controls input,.controls select,.controls button{font:inherit;font-size:.95em}
.scroll.tall{max-height:82vh;overflow:auto;border:1px solid #e2e2e2}
table.classes{margin:0}table.classes thead th{position:sticky;top:0;z-index:1;box-shadow:0 1px 0 #ccc}
th[data-sort]{cursor:pointer}th[data-sort]:hover{background:#e8eef8}
th.sorted-asc::after{content:" \\25B2";font-size:.7em}th.sorted-desc::after{content:" \\25BC";font-size:.7em}
"""


class ReportError(Exception):
    """The report cannot be written (bad destination, unreadable bundle content)."""


# ---------------------------------------------------------------------------------------------
# small helpers


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    """A metric value as short text: 4 significant digits, ints as they are, NaN/None as a dash."""
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "—" if math.isnan(v) else ("∞" if v > 0 else "−∞")
        if v == 0:
            return "0"
        if 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    if isinstance(v, (list, tuple)):
        items = [fmt(x) for x in v[:12]]
        return "[" + ", ".join(items) + (", …" if len(v) > 12 else "") + "]"
    return str(v)


def _float_or_none(v: Any) -> float | None:
    if _is_num(v) and math.isfinite(float(v)):
        return float(v)
    return None


def held_out_fidelity(info: dict) -> float | None:
    """Held-out ICE fidelity of a manifest class entry, or None when absent or not finite."""
    return _float_or_none(((info.get("metrics") or {}).get("held_out") or {}).get("ice_fidelity"))


def sort_classes(classes: dict[str, dict]) -> list[tuple[int, dict]]:
    """Manifest classes as (id, info), by held-out ICE fidelity ascending (lower is better);
    classes without a finite held-out fidelity go last, ties by class id."""
    items = [(int(k), v) for k, v in classes.items()]

    def key(item):
        f = held_out_fidelity(item[1])
        return (f is None, f if f is not None else 0.0, item[0])

    return sorted(items, key=key)


# ---------------------------------------------------------------------------------------------
# SVG line plot


@dataclass
class Series:
    label: str
    values: Sequence[float]
    color: str = "#2471a3"
    dashed: bool = False


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    span = hi - lo
    if span <= 0 or not math.isfinite(span):
        return [lo]
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def svg_line_plot(series: Sequence[Series], *, width: int = 520, height: int = 320, x_label: str = "",
                  y_label: str = "", title: str = "", y_range: tuple[float, float] | None = None) -> str:
    """An inline SVG line plot of ``series`` (point i at x = i), no scripts, no external refs.

    The y range is ``y_range``, else [0, 1] when every value lies in it (accuracies, probabilities),
    else the data's range padded by 5%. Non-finite values break a line. Each point carries a
    <title> tooltip with its value.
    """
    left, right, bottom = 54, 14, 44
    # legend rows in the top margin: entries left to right, wrapped at the plot's width
    legend, lx, row = [], left, 0
    for s in series:
        item_w = 30 + 6.2 * len(s.label)
        if lx > left and lx + item_w > width - right:
            lx, row = left, row + 1
        legend.append((s, lx, row))
        lx += item_w
    top = 18 + 16 * (row + 1) if series else 18
    pw, ph = width - left - right, height - top - bottom
    finite = [float(v) for s in series for v in s.values if _is_num(v) and math.isfinite(float(v))]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title or y_label)}" '
           f'font-family="sans-serif" font-size="11">']
    if title:
        out.append(f"<title>{esc(title)}</title>")
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>')
    if not finite:
        out.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" fill="#777">no data</text>')
        out.append("</svg>")
        return "".join(out)
    if y_range is not None:
        lo, hi = float(y_range[0]), float(y_range[1])
    elif min(finite) >= 0.0 and max(finite) <= 1.0:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = min(finite), max(finite)
        pad = (hi - lo) * 0.05 if hi > lo else max(abs(hi), 1.0) * 0.5
        lo, hi = lo - pad, hi + pad
    if hi <= lo:
        hi = lo + 1.0
    n_max = max((len(s.values) for s in series), default=1)
    x_hi = max(n_max - 1, 1)

    def px(i: float) -> float:
        return left + pw * (i / x_hi)

    def py(v: float) -> float:
        return top + ph * (hi - v) / (hi - lo)

    for t in _nice_ticks(lo, hi):
        y = py(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 5}" y="{y + 3.5:.1f}" text-anchor="end" fill="#444">{t:.3g}</text>')
    x_step = max(1, math.ceil(x_hi / 10))
    for i in range(0, x_hi + 1, x_step):
        x = px(i)
        out.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#999"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 15}" text-anchor="middle" fill="#444">{i}</text>')
    if x_label:
        out.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle" fill="#222">{esc(x_label)}</text>')
    if y_label:
        out.append(f'<text x="12" y="{top + ph / 2}" text-anchor="middle" fill="#222" '
                   f'transform="rotate(-90 12 {top + ph / 2})">{esc(y_label)}</text>')
    for s in series:
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        segment: list[str] = []
        segments = []
        points = []
        for i, v in enumerate(s.values):
            if _is_num(v) and math.isfinite(float(v)):
                x, y = px(i), py(min(max(float(v), lo), hi))
                segment.append(f"{x:.1f},{y:.1f}")
                points.append((i, float(v), x, y))
            elif segment:
                segments.append(segment)
                segment = []
        if segment:
            segments.append(segment)
        for seg in segments:
            if len(seg) > 1:
                out.append(f'<polyline fill="none" stroke="{esc(s.color)}" stroke-width="2"{dash} '
                           f'points="{" ".join(seg)}"/>')
        for i, v, x, y in points:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.6" fill="{esc(s.color)}">'
                       f"<title>{esc(s.label)}: {i} → {fmt(v)}</title></circle>")
    for s, lx, row in legend:
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        y = 14 + 16 * row
        out.append(f'<line x1="{lx:.1f}" y1="{y}" x2="{lx + 18:.1f}" y2="{y}" stroke="{esc(s.color)}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<text x="{lx + 22:.1f}" y="{y + 4}" fill="#222">{esc(s.label)}</text>')
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# images


def _inside(root: Path, rel: str) -> Path | None:
    """``root/rel`` if it is a file inside ``root`` (no escaping through .. or links), else None."""
    try:
        p = (root / rel).resolve()
        p.relative_to(root.resolve())
    except (ValueError, OSError):
        return None
    return p if p.is_file() else None


def _check_image(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def _example_images(bundle: Bundle, cid: int) -> list[Path | None]:
    """Paths of examples/<cid>/<i>.jpg (None where absent), as many as the codes tensor has rows,
    or as many consecutive files as exist when there is no codes tensor."""
    codes = bundle.tensors.get(f"examples/{cid}/codes")
    paths: list[Path | None] = []
    n = int(codes.shape[0]) if codes is not None else None
    i = 0
    while n is None or i < n:
        p = _inside(bundle.root, f"examples/{cid}/{i}.jpg")
        if n is None and p is None:
            break
        paths.append(p)
        i += 1
    return paths


def render_overlay(base: Image.Image | None, grid: np.ndarray, vmax: float, size: int) -> Image.Image:
    """The concept's code grid upsampled over the image (or over grey when there is no image)."""
    if base is None:
        base = Image.new("RGB", (size, size), (128, 128, 128))
    base = base.convert("RGB")
    if base.size != (size, size):
        base = base.resize((size, size), Image.BILINEAR)
    over, _ = overlay_image(np.asarray(grid, np.float32), (size, size), (0, 0, size, size), vmax=vmax)
    over = over.convert("RGBA")
    return Image.alpha_composite(base.convert("RGBA"), over).convert("RGB")


# ---------------------------------------------------------------------------------------------
# pages


def _page(title: str, body: str) -> str:
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title><link rel='stylesheet' href='style.css'></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def _flags_html(flags: Iterable[str]) -> str:
    return "".join(f"<span class=flag>{esc(f)}</span>" for f in flags)


def _info_dl(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs if v not in (None, ""))
    return f"<dl class=info>{rows}</dl>"


def _json_short(v: Any, limit: int = 200) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= limit else s[:limit] + "…"


def _header_html(bundle: Bundle) -> str:
    m = bundle.manifest
    model, method = m.model, m.method
    model_pairs = [
        ("model", f"<code>{esc(model.name)}</code>"),
        ("source", f"<code>{esc(model.source)}</code>"),
        ("layer", esc(model.layer) + (" (signed activations)" if model.signed_features else "")),
        ("features", esc("×".join(str(s) for s in model.feature_shape))),
        ("head", esc(model.head.kind)),
        ("classes in the model", esc(model.num_classes)),
        ("file sha256", f"<code>{esc(model.file_sha256[:16])}</code>" if model.file_sha256 else ""),
        ("preprocessing", esc(m.preprocessing.describe())),
    ]
    method_pairs = [("method", f"<b>{esc(method.name)}</b>")]
    method_pairs += [(f"{k}", esc(fmt(v) if not isinstance(v, (dict, list)) else _json_short(v)))
                     for k, v in sorted(method.params.items())]
    method_pairs += [("group by", esc(method.group_by)), ("max images", esc(method.max_images)),
                     ("held out", esc(fmt(method.held_out))), ("seed", esc(method.seed))]
    bundle_pairs = [
        ("bundle id", f"<code>{esc(m.bundle_id)}</code>"),
        ("created", esc(m.created_at)),
        ("data", f"<code>{esc(m.data.get('path', ''))}</code>" if m.data else ""),
        ("schema", esc(m.schema_version)),
    ]
    return ("<div style='display:flex;gap:3em;flex-wrap:wrap'>"
            f"<div><h2>Model</h2>{_info_dl(model_pairs)}</div>"
            f"<div><h2>Method</h2>{_info_dl(method_pairs)}</div>"
            f"<div><h2>Bundle</h2>{_info_dl(bundle_pairs)}</div></div>")


def _split(metrics: dict, name: str) -> dict:
    v = metrics.get(name)
    return v if isinstance(v, dict) else {}


def _stitched_summary(st: Any) -> tuple[str, float | None, str]:
    """The index's view of ``metrics["stitched"]``: (cell HTML, sort score, filter tokens).

    The score is ``pass_rate`` when the bundle records one (a share in [0, 1]), else the share of the
    recorded verdicts (``pass``, ``pass_excluding_class``) that passed; None when nothing was recorded.
    Tokens: ``pass``/``fail`` (the verdict), ``xpass``/``xfail`` (without the class's own images)."""
    if not isinstance(st, dict):
        return "—", None, ""
    p, px = st.get("pass"), st.get("pass_excluding_class")
    rate = _float_or_none(st.get("pass_rate"))
    verdicts = [bool(v) for v in (p, px) if isinstance(v, (bool, np.bool_))]
    tokens = []
    if isinstance(p, (bool, np.bool_)):
        tokens.append("pass" if p else "fail")
    if isinstance(px, (bool, np.bool_)):
        tokens.append("xpass" if px else "xfail")
    parts = []
    if "pass" in st:
        parts.append(_pass_html(p))
    if "pass_excluding_class" in st:
        parts.append(f"<span class=small title='without crops from images predicted as the class'>excl. "
                     f"{_pass_html(px)}</span>")
    if "pass_rate" in st:
        v = st.get("pass_rate")
        shown = f"{100 * rate:.0f}%" if rate is not None and 0.0 <= rate <= 1.0 else fmt(v)
        parts.append(f"<span class=small title='pass rate'>{esc(shown)}</span>")
    score = rate if rate is not None else (sum(verdicts) / len(verdicts) if verdicts else None)
    return (" ".join(parts) or "—"), score, " ".join(tokens)


def _attr_num(v: Any) -> str:
    """A finite number as a short, order-preserving attribute value; '' for none."""
    f = _float_or_none(v)
    if f is None:
        return ""
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else f"{f:.7g}"


# Sort keys of the index (the <select>, the URL's sort=, the clickable headers): key -> label.
INDEX_SORTS = {"fid": "held-out ICE fidelity", "name": "name", "id": "class id", "st": "stitched test",
               "k": "k (concepts)", "n": "images"}

# The index's controls: search, sort and filters, driven by the URL too (index.html#q=dog&sort=name&dir=desc
# &flag=any|none|<flag>&st=pass|fail|xpass|xfail|none; ?q=... works as well), so a view can be linked.
# Plain JavaScript, no network; without it the page is the full table in fidelity order.
INDEX_JS = r"""(function(){
var tb=document.getElementById('rows');if(!tb)return;
function $(i){return document.getElementById(i);}
function num(v){return v===undefined||v===''?null:+v;}
var R=Array.prototype.map.call(tb.rows,function(r,i){var a=r.querySelector('a'),d=r.dataset;
 return {r:r,i:i,id:+d.id,name:(a?a.textContent:'').trim(),fid:num(d.fid),st:num(d.st),k:num(d.k),n:num(d.n),
  f:(d.f||'').split(' ').filter(Boolean).map(Number),t:' '+(d.t||'')+' ',run:d.t!==undefined||d.st!==undefined};});
R.forEach(function(o){o.lname=o.name.toLowerCase();});
var q=$('q'),sort=$('sort'),dir=$('dir'),flag=$('flag'),st=$('st'),count=$('count'),ctl=$('controls');
var coll=new Intl.Collator(undefined,{numeric:true,sensitivity:'base'});
var flagIdx=Object.create(null);Array.prototype.forEach.call(flag.options,function(o){if(o.dataset.i!==undefined)flagIdx[o.value]=+o.dataset.i;});
var DEF={q:'',sort:'fid',dir:'asc',flag:'',st:''},cur=null;
function has(sel,v){return Array.prototype.some.call(sel.options,function(o){return o.value===v;});}
function read(){var s=location.hash.length>1?location.hash.slice(1):location.search.slice(1),p=new URLSearchParams(s),o={};
 for(var k in DEF)o[k]=p.has(k)?p.get(k):DEF[k];
 if(!has(sort,o.sort))o.sort=DEF.sort;if(o.dir!=='desc')o.dir='asc';
 if(!has(flag,o.flag))o.flag='';if(!has(st,o.st))o.st='';return o;}
function show(o){q.value=o.q;sort.value=o.sort;flag.value=o.flag;st.value=o.st;dir.dataset.dir=o.dir;
 dir.textContent=o.dir==='asc'?'\u2191 ascending':'\u2193 descending';}
function match(o,s){var t=s.q.trim().toLowerCase();
 if(t&&!(o.lname.indexOf(t)>=0||(/^\d+$/.test(t)&&o.id===+t)))return false;
 if(s.flag==='any'&&!o.f.length)return false;if(s.flag==='none'&&o.f.length)return false;
 if(s.flag in flagIdx&&o.f.indexOf(flagIdx[s.flag])<0)return false;
 if(s.st==='none'){if(o.run)return false;}else if(s.st&&o.t.indexOf(' '+s.st+' ')<0)return false;
 return true;}
function cmp(s){var key=s.sort,sg=s.dir==='desc'?-1:1;return function(a,b){var c;
 if(key==='name')c=coll.compare(a.name,b.name)*sg;
 else{var x=a[key],y=b[key];if(x===null||y===null)c=(x===null)-(y===null);else c=(x-y)*sg;}
 return c||a.i-b.i;};}
function apply(s){var prev=cur;cur=s;
 if(!prev||prev.sort!==s.sort||prev.dir!==s.dir){var o=R.slice().sort(cmp(s)),fr=document.createDocumentFragment();
  o.forEach(function(x){fr.appendChild(x.r);});tb.appendChild(fr);
  Array.prototype.forEach.call(document.querySelectorAll('th[data-sort]'),function(h){
   var on=h.dataset.sort===s.sort;h.classList.toggle('sorted-asc',on&&s.dir==='asc');
   h.classList.toggle('sorted-desc',on&&s.dir==='desc');});}
 var n=0;R.forEach(function(o){var m=match(o,s);if(m)n++;if(o.r.hidden===m)o.r.hidden=!m;});
 count.textContent=n===R.length?'all '+n+' classes shown':n+' of '+R.length+' classes shown';
 $('none').hidden=n>0;}
function state(){return {q:q.value,sort:sort.value,dir:dir.dataset.dir||'asc',flag:flag.value,st:st.value};}
function url(s){var p=new URLSearchParams();for(var k in DEF)if(s[k]!==DEF[k])p.set(k,s[k]);var h=p.toString();
 if(!h&&location.search)h='sort='+s.sort;  // an explicit default, or the ?query would come back on reload
 try{history.replaceState(null,'',h?'#'+h:location.pathname+location.search);}catch(e){}}
function update(){var s=state();apply(s);url(s);}
q.addEventListener('input',update);[sort,flag,st].forEach(function(e){e.addEventListener('change',update);});
dir.addEventListener('click',function(){dir.dataset.dir=dir.dataset.dir==='desc'?'asc':'desc';show(state());update();});
Array.prototype.forEach.call(document.querySelectorAll('th[data-sort]'),function(h){h.addEventListener('click',function(){
 var s=state();if(s.sort===h.dataset.sort)s.dir=s.dir==='asc'?'desc':'asc';else{s.sort=h.dataset.sort;s.dir='asc';}
 show(s);update();});});
$('reset').addEventListener('click',function(){show(DEF);update();});
window.addEventListener('hashchange',function(){var s=read();show(s);apply(s);});
document.addEventListener('keydown',function(e){if(e.key==='/'&&document.activeElement!==q){e.preventDefault();q.focus();}});
var s0=read();show(s0);apply(s0);ctl.hidden=false;
})();"""


def _index_controls(flag_counts: dict[str, int], n_flagged: int, n: int, has_stitched: bool) -> str:
    flag_opts = "".join(f"<option value='{esc(f)}' data-i={i}>{esc(f)} ({c})</option>"
                        for i, (f, c) in enumerate(flag_counts.items()))
    sort_opts = "".join(f"<option value='{k}'>{esc(v)}</option>" for k, v in INDEX_SORTS.items()
                        if k != "st" or has_stitched)
    st_sel = ("<label>stitched test <select id=st><option value=''>any</option><option value=pass>passed</option>"
              "<option value=fail>failed</option><option value=xpass>passed without the class's images</option>"
              "<option value=xfail>failed without the class's images</option><option value=none>not run</option>"
              "</select></label>") if has_stitched else "<select id=st hidden><option value=''></option></select>"
    return ("<div id=controls class=controls hidden>"
            "<label>search <input id=q type=search placeholder='class name or id' size=22 autocomplete=off></label>"
            f"<label>sort by <select id=sort>{sort_opts}</select></label>"
            "<button type=button id=dir data-dir=asc>↑ ascending</button>"
            f"<label>flags <select id=flag><option value=''>any or none ({n})</option>"
            f"<option value=any>flagged ({n_flagged})</option><option value=none>no flags ({n - n_flagged})</option>"
            f"{flag_opts}</select></label>{st_sel}"
            "<button type=button id=reset>reset</button> <span id=count class=muted></span></div>")


def render_index(bundle: Bundle, order: list[tuple[int, dict]]) -> str:
    """The index: the bundle's header, then one compact row per class (no images: those stay on the
    class pages), in order of held-out ICE fidelity; a small inline script adds search, sorting and
    filters (flags, stitched test), also from the URL (see INDEX_JS)."""
    m = bundle.manifest
    n_flagged = sum(1 for _, info in order if info.get("flags"))
    fids = [f for f in (held_out_fidelity(info) for _, info in order) if f is not None]
    optional = [k for k in INDEX_OPTIONAL
                if any(_is_num(_split(info.get("metrics") or {}, "held_out").get(k)) for _, info in order)]
    if "c_del_contribution" in optional and "c_del_sobol" in optional:
        optional.remove("c_del")  # it is one of the two
    has_stitched = any(isinstance((info.get("metrics") or {}).get("stitched"), dict) for _, info in order)
    flag_counts: dict[str, int] = {}
    for _, info in order:
        for f in dict.fromkeys(str(f) for f in info.get("flags") or []):
            flag_counts[f] = flag_counts.get(f, 0) + 1
    flag_counts = dict(sorted(flag_counts.items(), key=lambda kv: (-kv[1], kv[0])))
    flag_index = {f: i for i, f in enumerate(flag_counts)}

    def th(label: str, key: str | None = None, cls: str = "") -> str:
        attrs = (f" class={cls}" if cls else "") + (f" data-sort={key} title='sort by {esc(INDEX_SORTS[key])}'"
                                                    if key else "")
        return f"<th{attrs}>{label}</th>"

    parts = ["<h1>conceptlens evaluation report</h1>",
             f"<p>{len(order)} classes, <b>{n_flagged} flagged</b>"
             + (f"; held-out ICE fidelity median {fmt(float(np.median(fids)))}, "
                f"mean {fmt(float(np.mean(fids)))}" if fids else "") + ".</p>",
             _header_html(bundle),
             "<h2>Classes</h2>",
             "<p class='small muted'>In order of held-out ICE fidelity (lower is better), unless sorted otherwise; "
             "click a class for its concepts, prototypes and examples. Search, sorting and filters are kept in "
             "the address (<code>index.html#q=…&amp;sort=name&amp;flag=any</code>), so a view can be linked.</p>",
             _index_controls(flag_counts, n_flagged, len(order), has_stitched),
             "<p id=none class=muted hidden>No class matches.</p>",
             "<div class='scroll tall'><table class=classes><thead><tr><th title='rank by held-out ICE fidelity'>#</th>"
             + th("class", "name", "l")
             + th("flags", None, "l") + th("id", "id") + th("method", None, "l") + th("k", "k")
             + th("images<br><span class=small>train / held-out</span>", "n")
             + th("ICE<br>fidelity<br><span class=small>held-out ↓</span>", "fid")
             + th("top-1<br>agreement<br><span class=small>held-out ↑</span>")
             + th("recon.<br>error<br><span class=small>held-out ↓</span>")]
    for k in optional:
        label, hint = METRIC_LABELS.get(k, (k, ""))
        arrow = " ↓" if hint.startswith("lower") else " ↑" if hint.startswith("higher") else ""
        parts.append(f"<th title='{esc(label)} ({esc(k)})'>{INDEX_OPTIONAL[k]}<br>"
                     f"<span class=small>held-out{arrow}</span></th>")
    if has_stitched:
        parts.append(th("stitched test", "st"))
    parts.append("</tr></thead><tbody id=rows>")
    rows = []
    for rank, (cid, info) in enumerate(order, 1):
        metrics = info.get("metrics") or {}
        ho = _split(metrics, "held_out")
        flags = list(info.get("flags") or [])
        name = info.get("name", str(cid))
        images = info.get("images")
        held = info.get("held_out_images")
        train_n = images - held if _is_num(images) and _is_num(held) else images
        attrs = [f"data-id={cid}"]
        for key, v in (("fid", held_out_fidelity(info)), ("k", info.get("k")), ("n", images)):
            if _attr_num(v):
                attrs.append(f"data-{key}={_attr_num(v)}")
        if flags:
            attrs.insert(0, "class=flagged")
            attrs.append(f"data-f='{' '.join(str(flag_index[str(f)]) for f in dict.fromkeys(map(str, flags)))}'")
        cells = [f"<td>{rank}", f"<td class=l>{'⚑ ' if flags else ''}<a href='class-{cid}.html'>{esc(name)}</a>",
                 f"<td class='l flags'>{_flags_html(flags)}",
                 f"<td>{cid}<td class=l>{esc(info.get('method', ''))}<td>{esc(fmt(info.get('k')))}",
                 f"<td>{esc(fmt(train_n))} / {esc(fmt(held))}",
                 f"<td>{esc(fmt(ho.get('ice_fidelity')))}",
                 f"<td>{esc(fmt(ho.get('top1_agreement')))}",
                 f"<td>{esc(fmt(ho.get('recon_error')))}"]
        cells += [f"<td>{esc(fmt(ho.get(k)))}" for k in optional]
        if has_stitched:
            cell, score, tokens = _stitched_summary(metrics.get("stitched"))
            if tokens:
                attrs.append(f"data-t='{tokens}'")
            if score is not None:
                attrs.append(f"data-st={_attr_num(score)}")
            cells.append(f"<td>{cell}")
        rows.append(f"<tr {' '.join(attrs)}>{''.join(cells)}</tr>")
    parts.append("\n".join(rows))
    parts.append("</tbody></table></div>")
    parts.append(_footer(bundle))
    parts.append(f"<script>{INDEX_JS}</script>")
    return _page(f"conceptlens report — {m.model.name}", "\n".join(parts))


def _footer(bundle: Bundle) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return (f"<p class='muted small'>Written by <code>conceptlens report</code> at {esc(now)} from bundle "
            f"<code>{esc(bundle.manifest.bundle_id)}</code>.</p>")


def _pass_html(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "<span class=pass>pass</span>" if v else "<span class=fail>FAIL</span>"
    return esc(fmt(v))


def _selection_html(selection: dict | None) -> str:
    """How k and FACE's lambda were chosen (precompute/selection.py): the sweeps, the choice, the merges."""
    if not isinstance(selection, dict) or not selection:
        return ""
    parts = ["<h2>How many concepts</h2>"]
    k = selection.get("k")
    if isinstance(k, dict):
        rows = "".join(f"<tr{' class=chosen' if r.get('k') == k.get('chosen') else ''}><td>{esc(fmt(r.get('k')))}</td>"
                       f"<td>{esc(fmt(r.get('val_ice_fidelity')))}</td><td>{esc(fmt(r.get('stability')))}</td></tr>"
                       for r in k.get("sweep", []))
        parts.append(f"<p>k = <b>{esc(fmt(k.get('chosen')))}</b>: the smallest k within 0.02 (or 10 %) of the best "
                     "validation ICE fidelity whose stability is at least 0.8.</p><table><tr><th>k</th>"
                     f"<th>validation ICE fidelity ↓</th><th>stability ↑</th></tr>{rows}</table>")
    if selection.get("merged"):
        parts.append(f"<p>Merged as one direction seen at different places: "
                     f"{esc(', '.join(f'{i}+{j}' for i, j in selection['merged']))}; k after merging "
                     f"{esc(fmt(selection.get('k_after_merge')))}.</p>")
    lam = selection.get("lambda")
    if isinstance(lam, dict):
        rows = "".join(f"<tr{' class=chosen' if r.get('lambda') == lam.get('chosen') else ''}>"
                       f"<td>{esc(fmt(r.get('lambda')))}</td><td>{esc(fmt(r.get('val_ice_fidelity')))}</td>"
                       f"<td>{esc(fmt(r.get('val_top1_agreement')))}</td></tr>" for r in lam.get("sweep", []))
        parts.append(f"<p>FACE's λ = <b>{esc(fmt(lam.get('chosen')))}</b>: the best validation ICE fidelity among "
                     "the λ that keep top-1 agreement within 0.02 of λ = 0.</p><table><tr><th>λ</th>"
                     f"<th>validation ICE fidelity ↓</th><th>top-1 agreement ↑</th></tr>{rows}</table>")
    return "".join(parts)


def _metrics_table(metrics: dict) -> str:
    splits = [s for s in SPLITS if _split(metrics, s)]
    splits += [s for s, v in metrics.items()  # any other split-like dict of scalars (e.g. a fold)
               if s not in splits and s not in ("stitched", "shift") and isinstance(v, dict) and v
               and all(_is_num(x) or isinstance(x, (list, bool)) for x in v.values())]
    if not splits:
        return "<p class=muted>no metrics recorded</p>"
    keys: list[str] = []
    for s in splits:
        for k, v in _split(metrics, s).items():
            if k not in keys and not isinstance(v, (list, dict)) and k not in ORDERING_KEYS:
                keys.append(k)
    keys.sort(key=lambda k: (METRIC_ORDER.index(k) if k in METRIC_ORDER else len(METRIC_ORDER), k))
    rows = ["<table class=metrics><tr><th class=l>metric</th>"
            + "".join(f"<th>{esc(SPLIT_TITLES.get(s, s))}</th>" for s in splits) + "<th class=l></th></tr>"]
    for k in keys:
        label, hint = METRIC_LABELS.get(k, (k, ""))
        rows.append(f"<tr><td class=l>{esc(label)} <code class=small>{esc(k)}</code></td>"
                    + "".join(f"<td>{esc(fmt(_split(metrics, s).get(k)))}</td>" for s in splits)
                    + f"<td class='l muted small'>{esc(hint)}</td></tr>")
    # other list-valued entries that are neither plotted nor per-concept
    for s in splits:
        for k, v in _split(metrics, s).items():
            if isinstance(v, (list, dict)) and k not in CURVES and k != "importance" and k not in ORDERING_KEYS:
                rows.append(f"<tr><td class=l><code class=small>{esc(k)}</code> ({esc(SPLIT_TITLES.get(s, s))})</td>"
                            f"<td class=l colspan={len(splits) + 1}><code class=small>{esc(_json_short(v))}</code></td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _curves_html(metrics: dict) -> str:
    series = []
    for s in SPLITS:
        split = _split(metrics, s)
        for key, (label, color) in CURVES.items():
            vals = split.get(key)
            if isinstance(vals, list) and vals:
                series.append(Series(f"{label} ({SPLIT_TITLES[s]})", vals, color, dashed=(s != "held_out")))
    if not series:
        return ""
    plot = svg_line_plot(series, x_label="top concepts removed (deletion) / inserted (insertion)",
                         y_label="accuracy", title="concept deletion and insertion curves")
    kind = next((_split(metrics, s).get("importance_kind") for s in SPLITS
                 if isinstance(_split(metrics, s).get("importance_kind"), str)), None)
    by = f" by {ORDERINGS.get(kind, kind)}" if kind else " by importance"
    return ("<h2>Deletion and insertion curves</h2>"
            "<p class='small muted'>Accuracy after removing (deletion) or keeping only (insertion) the "
            f"top-i concepts{esc(by)}, i = 0…k. A faithful basis drops fast under deletion and "
            "rises fast under insertion.</p>"
            f"<div class=plots>{plot}{_orderings_plot(metrics)}</div>{_orderings_table(metrics)}")


def _orderings_split(metrics: dict) -> str | None:
    """The split whose curves were computed for both concept orderings (held-out, else train)."""
    return next((s for s in SPLITS if all(_is_num(_split(metrics, s).get(f"c_del_{o}")) for o in ORDERINGS)), None)


def _orderings_plot(metrics: dict) -> str:
    """Deletion and insertion curves of both concept orderings on one split, side by side."""
    s = _orderings_split(metrics)
    if s is None:
        return ""
    split = _split(metrics, s)
    series = []
    for (o, short), dashed in zip((("contribution", "contribution"), ("sobol", "Sobol")), (False, True)):
        for key, (label, color) in CURVES.items():
            vals = split.get(f"{key}_{o}")
            if isinstance(vals, list) and vals:
                series.append(Series(f"{label}, {short} order", vals, color, dashed=dashed))
    if not series:
        return ""
    return svg_line_plot(series, x_label="top concepts removed / inserted", y_label="accuracy",
                         title=f"deletion and insertion by concept order ({SPLIT_TITLES[s]})")


def _orderings_table(metrics: dict) -> str:
    """C-Del, C-Ins and Gini of both concept orderings."""
    s = _orderings_split(metrics)
    if s is None:
        return ""
    split = _split(metrics, s)
    kind = split.get("importance_kind")
    rows = [f"<table class=orderings><tr><th class=l>concepts ordered by <span class=small>({esc(SPLIT_TITLES[s])})"
            "</span></th><th>C-Del ↑</th><th>C-Ins ↑</th><th>Gini</th></tr>"]
    for o, label in ORDERINGS.items():
        mark = " <span class='small muted'>(the order of the curves above and the metrics)</span>" if o == kind else ""
        rows.append(f"<tr><td class=l>{esc(label)}{mark}</td>"
                    + "".join(f"<td>{esc(fmt(split.get(f'{m}_{o}')))}</td>" for m in ("c_del", "c_ins", "gini"))
                    + "</tr>")
    rows.append("</table>")
    return ("<p class='small muted'>The same test with the concepts ordered by their mean contribution to the "
            "class logit and by CRAFT's Sobol total-order importance (the share of the logit's variance "
            "each concept accounts for when the concepts' codes are randomly scaled; FACE's order). "
            "C-Del = Σ<sub>i</sub> (acc<sub>0</sub> − acc<sub>i</sub>) / (k + 1), C-Ins = the mean of the "
            "insertion curve over i = 1…k.</p>" + "".join(rows))


def _kv_table(d: dict, skip: Iterable[str] = ()) -> str:
    rows = []
    for k, v in d.items():
        if k in skip:
            continue
        if isinstance(v, (bool, np.bool_)) and ("pass" in k):
            val = _pass_html(v)
        elif isinstance(v, (dict, list)):
            val = f"<code class=small>{esc(_json_short(v, 400))}</code>"
        else:
            val = esc(fmt(v))
        rows.append(f"<tr><td class=l>{esc(k)}</td><td class=l>{val}</td></tr>")
    return f"<table>{''.join(rows)}</table>" if rows else ""


def _stitched_html(st: Any, class_name: str) -> str:
    if not isinstance(st, dict):
        return ""
    verdict = _pass_html(st.get("pass")) if "pass" in st else ""
    pred = ""
    if "predicted" in st or "predicted_name" in st:
        pred = (f" — the stitched image is predicted as <b>{esc(st.get('predicted_name', ''))}</b>"
                f" ({esc(fmt(st.get('predicted')))})"
                + (f" with probability {esc(fmt(st.get('probability')))}" if "probability" in st else ""))
    excl = ""
    if "pass_excluding_class" in st:
        excl = (f"<br>Without crops from images predicted as {esc(class_name)}: "
                f"{_pass_html(st.get('pass_excluding_class'))}")
        if "predicted_name_excluding_class" in st or "predicted_excluding_class" in st:
            excl += (f" — predicted as <b>{esc(st.get('predicted_name_excluding_class', ''))}</b>"
                     f" ({esc(fmt(st.get('predicted_excluding_class')))})")
            if "probability_excluding_class" in st:
                excl += f" with probability {esc(fmt(st.get('probability_excluding_class')))}"
    return ("<h2>Stitched-prototype test</h2>"
            "<p class='small muted'>The top crop of each concept stitched into one image: does the model "
            "predict the class from its concepts alone?</p>"
            f"<p>{verdict}{pred}{excl}</p>{_kv_table(st)}")


def _shift_html(sh: Any) -> str:
    if not isinstance(sh, dict):
        return ""
    pairs = sh.get("pairs") if isinstance(sh.get("pairs"), list) else []
    parts = ["<h2>Hyperplane shifting test</h2>",
             "<p class='small muted'>Activations shifted along the contrast hyperplane's normal towards "
             "the target class: the target's probability should rise from its baseline.</p>"]
    if pairs:
        known = ("source", "source_name", "target", "target_name", "baseline_probability", "max_probability")
        has_source = any(isinstance(p, dict) and ("source" in p or "source_name" in p) for p in pairs)
        extra = []
        for p in pairs:
            for k in (p if isinstance(p, dict) else {}):
                if k not in known and k not in extra:
                    extra.append(k)
        parts.append("<table><tr>" + ("<th class=l>from</th><th>id</th>" if has_source else "")
                     + "<th class=l>target</th><th>id</th><th>baseline probability</th>"
                     "<th>max probability</th><th>change</th>"
                     + "".join(f"<th>{esc(k)}</th>" for k in extra) + "</tr>")
        for p in pairs:
            if not isinstance(p, dict):
                continue
            b, mx = _float_or_none(p.get("baseline_probability")), _float_or_none(p.get("max_probability"))
            change = f"{mx - b:+.3f}" if b is not None and mx is not None else "—"
            src = (f"<td class=l>{esc(p.get('source_name', ''))}</td><td>{esc(fmt(p.get('source')))}</td>"
                   if has_source else "")
            parts.append(f"<tr>{src}<td class=l>{esc(p.get('target_name', ''))}</td><td>{esc(fmt(p.get('target')))}</td>"
                         f"<td>{esc(fmt(p.get('baseline_probability')))}</td><td>{esc(fmt(p.get('max_probability')))}</td>"
                         f"<td>{esc(change)}</td>"
                         + "".join(f"<td>{_pass_html(p.get(k)) if isinstance(p.get(k), bool) else esc(fmt(p.get(k)))}</td>"
                                   for k in extra) + "</tr>")
        parts.append("</table>")
    parts.append(_kv_table(sh, skip=("pairs",)))
    return "".join(parts)


class _ClassRenderer:
    def __init__(self, bundle: Bundle, out: Path):
        self.bundle, self.out = bundle, out

    def _img_dir(self, cid: int) -> Path:
        d = self.out / "img" / str(cid)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def concepts_html(self, cid: int, info: dict) -> str:
        cc = self.bundle.classes.get(cid)
        if cc is None:
            return "<p class=muted>no concepts for this class in concepts.safetensors</p>"
        columns = self._importance_columns(cc)
        top_w = max([abs(float(w)) for w in cc.weights] + [1e-12])
        parts = ["<table class=concepts><tr><th>concept</th><th>weight</th><th class=l></th>"
                 + "".join(head for head, _ in columns)
                 + "<th class=l>prototype crops (cosine score)</th></tr>"]
        for j in range(cc.k):
            w = float(cc.weights[j])
            bar = (f"<span class='bar {'pos' if w >= 0 else 'neg'}' "
                   f"style='width:{int(round(100 * abs(w) / top_w))}px'></span>")
            figs = []
            refs = cc.prototypes[j] if j < len(cc.prototypes) else []
            for r, ref in enumerate(refs):
                src = _inside(self.bundle.root, ref.file)
                tip = esc(f"{ref.source} box {tuple(ref.box)} score {ref.score:.3f}")
                if src is None or not _check_image(src):
                    figs.append(f"<figure><span class='muted small' title='{tip}'>missing crop</span></figure>")
                    continue
                ext = src.suffix.lower() if src.suffix.lower() in (".jpg", ".jpeg", ".png") else ".jpg"
                dst = self._img_dir(cid) / f"p{j}_{r}{ext}"
                shutil.copyfile(src, dst)
                rel = dst.relative_to(self.out).as_posix()
                figs.append(f"<figure><a href='{esc(rel)}'><img src='{esc(rel)}' alt='concept {j} prototype {r}' "
                            f"title='{tip}'></a><figcaption>{ref.score:.2f}</figcaption></figure>")
            imp = "".join(f"<td>{esc(fmt(values[j]))}"
                          + (f" <span class='muted small'>#{rank[j]}</span>" if rank else "") + "</td>"
                          for _, (values, rank) in columns)
            parts.append(f"<tr><td>{j}</td><td>{w:.4f}</td><td class=l>{bar}</td>{imp}"
                         f"<td class='l protos'>{''.join(figs) or '<span class=muted>none</span>'}</td></tr>")
        parts.append("</table>")
        return "".join(parts)

    @staticmethod
    def _importance_columns(cc) -> list[tuple[str, tuple[list, dict | None]]]:
        """Per-concept importance columns (header, (values, rank of each concept)) of the split with the
        curves: mean contribution and Sobol importance when the bundle has both, else its ``importance``."""
        for s in SPLITS:
            split = _split(cc.metrics, s)
            cols = []
            for o, label in (("contribution", "contribution"), ("sobol", "Sobol importance")):
                v = split.get(f"{o}_importance")
                if isinstance(v, list) and len(v) == cc.k and all(_is_num(x) for x in v):
                    order = sorted(range(cc.k), key=lambda j: -float(v[j]))
                    cols.append((f"<th>{label}<br><span class=small>{SPLIT_TITLES[s]} (rank)</span></th>",
                                 (v, {j: r + 1 for r, j in enumerate(order)})))
            if cols:
                return cols
            v = split.get("importance")
            if isinstance(v, list) and len(v) == cc.k:
                return [(f"<th>importance<br><span class=small>{SPLIT_TITLES[s]}</span></th>", (v, None))]
        return []

    def examples_html(self, cid: int) -> str:
        b = self.bundle
        codes = b.tensors.get(f"examples/{cid}/codes")
        paths = _example_images(b, cid)
        if codes is None and not paths:
            return ""
        crop = int(b.preprocessing.crop)
        size = min(crop, 224)
        cc = b.classes.get(cid)
        if codes is not None:
            codes = np.asarray(codes, np.float32)
            if codes.ndim != 4:
                return f"<h2>Examples</h2><p class=muted>examples/{cid}/codes has shape {codes.shape}, expected (n, k, H, W)</p>"
            codes = np.maximum(codes, 0.0)
            vmax = codes.max(axis=(0, 2, 3))  # one scale per concept, shared by all examples
        parts = ["<h2>Examples</h2>",
                 "<p class='small muted'>Each concept's code map over the image the model saw "
                 f"({crop}×{crop}), upsampled; one color scale per concept across these examples "
                 "(transparent at 0, opaque yellow at the concept's largest code). Under each map: the "
                 "concept's presence s (mean code) and contribution c = s·w.</p>",
                 "<table class=examples><tr><th>example</th>"]
        k = codes.shape[1] if codes is not None else 0
        parts.append("".join(f"<th>concept {j}</th>" for j in range(k)) + "</tr>")
        d = self._img_dir(cid)
        for i, path in enumerate(paths):
            base = None
            if path is not None:
                try:
                    with Image.open(path) as im:
                        base = im.convert("RGB")
                except Exception:
                    base = None
            cells = []
            if base is not None:
                shown = base if base.size == (size, size) else base.resize((size, size), Image.BILINEAR)
                dst = d / f"ex{i}.jpg"
                shown.save(dst, format="JPEG", quality=88)
                rel = dst.relative_to(self.out).as_posix()
                cells.append(f"<td><figure><a href='{esc(rel)}'><img src='{esc(rel)}' alt='example {i}'></a>"
                             f"<figcaption>#{i}</figcaption></figure></td>")
            else:
                cells.append(f"<td class=muted>#{i}<br>(no image)</td>")
            for j in range(k):
                grid = codes[i, j]
                dst = d / f"ex{i}_c{j}.jpg"
                render_overlay(base, grid, float(vmax[j]), size).save(dst, format="JPEG", quality=85)
                rel = dst.relative_to(self.out).as_posix()
                s = float(grid.mean())
                cap = f"s {s:.3f}"
                if cc is not None and j < cc.k:
                    cap += f", c {s * float(cc.weights[j]):.3f}"
                cells.append(f"<td><figure><a href='{esc(rel)}'><img src='{esc(rel)}' alt='example {i} concept {j}'>"
                             f"</a><figcaption>{esc(cap)}</figcaption></figure></td>")
            parts.append(f"<tr>{''.join(cells)}</tr>")
        parts.append("</table>")
        return "".join(parts)

    def page(self, cid: int, info: dict, prev: tuple[int, dict] | None, nxt: tuple[int, dict] | None,
             rank: int, total: int) -> str:
        name = info.get("name", str(cid))
        flags = list(info.get("flags") or [])
        metrics = info.get("metrics") or {}
        nav = ["<a href='index.html'>← all classes</a>"]
        if prev:
            nav.append(f"<a href='class-{prev[0]}.html'>‹ {esc(prev[1].get('name', prev[0]))}</a>")
        if nxt:
            nav.append(f"<a href='class-{nxt[0]}.html'>{esc(nxt[1].get('name', nxt[0]))} ›</a>")
        parts = [f"<nav>{''.join(nav)}</nav>",
                 f"<h1>{esc(name)} <span class=muted>(class {cid})</span></h1>",
                 f"<p>Rank {rank} of {total} by held-out ICE fidelity. Method <b>{esc(info.get('method', ''))}</b>, "
                 f"k = {esc(fmt(info.get('k')))}; images {esc(fmt(info.get('images')))} "
                 f"(held out {esc(fmt(info.get('held_out_images')))}"
                 + (f", seen {esc(fmt(info.get('images_seen')))}" if "images_seen" in info else "") + ").</p>"]
        if flags:
            parts.append(f"<div class=warn><b>Flagged:</b> {_flags_html(flags)} — this class's explanations "
                         "did not pass the evaluation; the service reports these flags with them.</div>")
        parts.append("<h2>Metrics</h2>" + _metrics_table(metrics))
        parts.append(_curves_html(metrics))
        parts.append(_selection_html(metrics.get("selection")))
        parts.append(_stitched_html(metrics.get("stitched"), name))
        parts.append(_shift_html(metrics.get("shift")))
        parts.append("<h2>Concepts</h2>"
                     "<p class='small muted'>Weight: the change of the class logit per unit of the concept's "
                     "presence. Contribution: the concept's mean presence × weight over the images. Sobol "
                     "importance: its total-order index (CRAFT). Prototypes: the dataset crops whose mean "
                     "activation is closest to the concept direction.</p>" + self.concepts_html(cid, info))
        parts.append(self.examples_html(cid))
        other = {k: v for k, v in metrics.items() if k not in ("stitched", "shift", "selection") and k not in SPLITS
                 and not (isinstance(v, dict) and v and all(_is_num(x) or isinstance(x, (list, bool)) for x in v.values()))}
        if other:
            parts.append("<h2>Other evaluation results</h2>" + _kv_table(other))
        parts.append(_footer(self.bundle))
        return _page(f"{name} — conceptlens report", "\n".join(p for p in parts if p))


# ---------------------------------------------------------------------------------------------
# entry points


def default_out_dir(bundle_dir: str | os.PathLike) -> Path:
    """``<parent>/<bundle name>-report``, next to the bundle (demo-out/bundle -> demo-out/bundle-report)."""
    b = Path(bundle_dir).resolve()
    return b.parent / f"{b.name}-report"


def render_report(bundle: Bundle, out: Path) -> None:
    """Write the report of a loaded bundle into the (empty) directory ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "style.css").write_text(CSS, encoding="utf-8")
    order = sort_classes({str(k): v.to_dict() for k, v in bundle.manifest.classes.items()})
    (out / "index.html").write_text(render_index(bundle, order), encoding="utf-8")
    r = _ClassRenderer(bundle, out)
    for i, (cid, info) in enumerate(order):
        prev = order[i - 1] if i > 0 else None
        nxt = order[i + 1] if i + 1 < len(order) else None
        (out / f"class-{cid}.html").write_text(r.page(cid, info, prev, nxt, i + 1, len(order)), encoding="utf-8")
    (out / MARKER).write_text(json.dumps({"bundle_id": bundle.manifest.bundle_id,
                                          "bundle": str(bundle.root.resolve())}) + "\n")


def _check_destination(bundle_root: Path, out: Path) -> None:
    b, o = bundle_root.resolve(), out.resolve()
    if o == b or b.is_relative_to(o) or o.is_relative_to(b):
        raise ReportError(f"report directory {out} must be outside the bundle {bundle_root} (and not contain it)")
    if o.exists():
        if not o.is_dir():
            raise ReportError(f"{out} exists and is not a directory")
        if any(o.iterdir()) and not (o / MARKER).is_file():
            raise ReportError(f"refusing to replace {out}: it is not empty and is not a conceptlens report "
                              f"(no {MARKER} in it)")


def write_report(bundle_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 verify: bool = True) -> Path:
    """Load the bundle at ``bundle_dir`` and publish its report at ``out`` (default:
    :func:`default_out_dir`); returns the report directory.

    Raises BundleError for a missing or corrupt bundle, ReportError for a bad destination.
    The report is written into a temporary sibling of ``out`` and renamed into place; an older
    report at ``out`` is moved aside first and removed after.
    """
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir, verify=verify)
    out = Path(out) if out is not None else default_out_dir(bundle_dir)
    _check_destination(bundle_dir, out)
    with staged_dir(out) as tmp:
        try:
            render_report(bundle, tmp)
        except (KeyError, ValueError, TypeError) as e:
            raise BundleError(f"bundle {bundle_dir} has malformed content: {type(e).__name__}: {e}") from e
    return out
