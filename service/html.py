"""Rendering shared by the server and the client: heatmap overlays (PNG) and the HTML page.

``overlay_png`` turns one concept's H x W code grid into a palette PNG the size of the original
image: the grid is upsampled (bilinear) over the center crop the model saw, colored from
transparent (code 0) to opaque yellow (the grid's max), and everything outside the crop is
transparent. Laid over the image, it shows where the concept is.

``render_page`` writes a self-contained HTML page (images inline as data URIs) of an
ExplainResponse: per explained class, the identity line and one row per concept with its
numbers, the image with the concept's overlay, and the prototype crops.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image


def _palette() -> bytes:
    """256 RGBA entries: transparent dark red at 0 through orange to opaque yellow at 255."""
    t = np.linspace(0.0, 1.0, 256)
    r = np.clip(0.5 + 1.5 * t, 0, 1)
    g = np.clip(1.6 * t - 0.4, 0, 1)
    b = np.clip(3.0 * t - 2.4, 0, 1) * 0.6
    a = np.clip(t * 1.4, 0, 0.85)
    rgba = np.stack([r, g, b, a], axis=1)
    return (rgba * 255 + 0.5).astype(np.uint8).tobytes()


PALETTE = _palette()


def overlay_png(grid: np.ndarray, image_size: tuple[int, int], crop_box: tuple[int, int, int, int],
                vmax: float | None = None) -> tuple[bytes, float]:
    """PNG bytes of the overlay and the code mapped to full color (``vmax``, default the grid max).

    grid: (H, W) float32 codes >= 0; image_size: (width, height) of the original image;
    crop_box: (x0, y0, x1, y1) of the model's crop in the image's pixels.
    """
    canvas, top = overlay_image(grid, image_size, crop_box, vmax)
    out = io.BytesIO()
    canvas.save(out, format="PNG", compress_level=1)
    return out.getvalue(), top


def overlay_image(grid: np.ndarray, image_size: tuple[int, int], crop_box: tuple[int, int, int, int],
                  vmax: float | None = None) -> tuple[Image.Image, float]:
    """The overlay of :func:`overlay_png` as a palette (RGBA) PIL image, not encoded."""
    w, h = int(image_size[0]), int(image_size[1])
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    top = float(grid.max(initial=0.0)) if vmax is None else float(vmax)
    scaled = np.zeros(grid.shape, np.uint8) if top <= 0 else \
        np.clip(grid * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
    heat = Image.fromarray(scaled, "L").resize((max(1, x1 - x0), max(1, y1 - y0)), Image.BILINEAR)
    canvas = Image.new("L", (w, h), 0)
    canvas.paste(heat, (x0, y0))
    canvas = canvas.convert("P")  # same indices: L values become palette indices
    canvas.putpalette(PALETTE, rawmode="RGBA")
    return canvas, top


def raw_grid(grid: np.ndarray) -> tuple[bytes, float]:
    """(uint8 row-major bytes, scale) with value ~= byte * scale; codes are >= 0."""
    top = float(grid.max(initial=0.0))
    if top <= 0:
        return bytes(grid.size), 0.0
    scale = top / 255.0
    return np.clip(grid / scale + 0.5, 0, 255).astype(np.uint8).tobytes(), scale


def _mime(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def data_uri(data: bytes) -> str:
    return f"data:{_mime(data)};base64,{base64.b64encode(data).decode()}"


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;
text-align:right;vertical-align:middle}th{background:#f4f4f4}td.l,th.l{text-align:left}
.stack{display:inline-block;width:160px;background-size:100% 100%;background-repeat:no-repeat}
.stack img{display:block;width:100%;height:100%}
.protos img{height:72px;margin-right:4px;border:1px solid #ccc}
.flag{background:#fff3cd;border:1px solid #e0c060;padding:.4em .8em;display:inline-block}
.eq{font-family:monospace;background:#f7f7f7;padding:.4em .8em;display:inline-block}
.bar{display:inline-block;height:10px}.pos{background:#3a7}.neg{background:#c44}
"""


def render_page(image: bytes, response, title: str = "conceptlens explanation") -> str:
    """Self-contained HTML for an ExplainResponse (conceptlens.v1) of ``image``."""
    e = html.escape
    img_uri = data_uri(image)
    info = response.image
    aspect = f"{max(info.width, 1)}/{max(info.height, 1)}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{_CSS}.stack{{background-image:url({img_uri});aspect-ratio:{aspect}}}</style></head>"
             f"<body><h1>{e(title)}</h1><p><img src='{img_uri}' alt='image' style='max-width:320px'></p>",
             f"<p>bundle <code>{e(response.bundle_id)}</code>"
             f"{' (from cache)' if response.cache_hit else ''}</p>",
             "<h2>Top predictions</h2><table><tr><th class=l>class</th><th>id</th><th>logit</th>"
             "<th>probability</th></tr>"]
    for p in response.predictions:
        parts.append(f"<tr><td class=l>{e(p.class_name)}</td><td>{p.class_id}</td><td>{p.logit:.3f}</td>"
                     f"<td>{p.probability:.3f}</td></tr>")
    parts.append("</table>")
    for x in response.explanations:
        what = e(x.class_name) + (f" rather than {e(x.contrast_class_name)}" if x.HasField("contrast_class_id") else "")
        parts.append(f"<h2>{what} <small>(class {x.class_id}, {e(x.method or 'no concepts')})</small></h2>")
        if "no_concepts" in x.flags:
            parts.append("<p class=flag>the bundle has no concepts for this class: all of the logit is residual</p>")
        elif x.flags:
            parts.append(f"<p class=flag>evaluation flags: {e(', '.join(x.flags))} — "
                         f"this explanation is not to be trusted</p>")
        total = sum(c.contribution for c in x.concepts)
        lhs = "logit" if not x.HasField("contrast_class_id") else "logit difference"
        omitted = f" + {x.omitted_contribution:.3f} (omitted concepts)" if x.omitted_contribution else ""
        parts.append(f"<p class=eq>{lhs} {x.logit:.3f} = Σ contributions {total:.3f}{omitted} + residual "
                     f"{x.residual:.3f} + bias {x.bias:.3f} &nbsp; (relative residual "
                     f"{x.relative_residual:.1%})</p>")
        top = max([abs(c.contribution) for c in x.concepts] + [1e-12])
        parts.append("<table><tr><th>concept</th><th>presence</th><th>weight</th><th>contribution</th>"
                     "<th class=l></th><th class=l>where</th><th class=l>prototypes</th></tr>")
        for c in x.concepts:
            width = int(120 * abs(c.contribution) / top)
            bar = f"<span class='bar {'pos' if c.contribution >= 0 else 'neg'}' style='width:{width}px'></span>"
            where = ""
            if c.heatmap.format == 3 and c.heatmap.data:  # HEATMAP_FORMAT_PNG_OVERLAY
                where = f"<span class=stack><img src='{data_uri(c.heatmap.data)}' alt='concept {c.concept_id}'></span>"
            protos = "".join(
                f"<img src='{data_uri(p.jpeg)}' title='{e(p.source)} {p.box.x0},{p.box.y0},{p.box.x1},{p.box.y1} "
                f"score {p.score:.2f}'>" if p.jpeg else f"<code>{e(p.source)}</code> "
                for p in c.prototypes)
            parts.append(f"<tr><td>{c.concept_id}</td><td>{c.presence:.4f}</td><td>{c.weight:.4f}</td>"
                         f"<td>{c.contribution:.4f}</td><td class=l>{bar}</td><td class=l>{where}</td>"
                         f"<td class='l protos'>{protos}</td></tr>")
        parts.append("</table>")
    t = response.timings
    parts.append(f"<p><small>server timings (ms): decode {t.decode_seconds * 1e3:.1f}, queue "
                 f"{t.queue_seconds * 1e3:.1f}, inference {t.inference_seconds * 1e3:.1f} (batch {t.batch_size}), "
                 f"explain {t.explain_seconds * 1e3:.1f}, encode {t.encode_seconds * 1e3:.1f}, total "
                 f"{t.total_seconds * 1e3:.1f}</small></p></body></html>")
    return "\n".join(parts)
