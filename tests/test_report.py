"""`conceptlens report`: the static HTML evaluation report (issue 4), rendered for a real bundle and
checked in headless Chromium (Debian's `chromium`), plus fast unit tests of its parts."""
from __future__ import annotations

import functools
import html.parser
import http.server
import io
import json
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptlens.precompute.report import (MARKER, Series, default_out_dir, held_out_fidelity, sort_classes,
                                           svg_line_plot, write_report)
from conceptlens.service.bundle import compute_bundle_id, load_bundle, sha256_file
from conceptlens.service.cli import main as cli_main

CHROMIUM = Path("/usr/bin/chromium")
SVG = "{http://www.w3.org/2000/svg}"


# ------------------------------------------------------------------------------------------------
# fast unit tests


def test_svg_line_plot_maps_points_and_is_valid_svg():
    svg = svg_line_plot([Series("deletion", [1.0, 0.5, 0.0], "#c00"),
                         Series("insertion", [0.0, float("nan"), 0.25, 1.0], "#00c", dashed=True)],
                        width=400, height=300, x_label="concepts", y_label="accuracy", title="t <&>")
    root = ET.fromstring(svg)  # well-formed XML, labels escaped
    assert root.tag == SVG + "svg" and root.get("viewBox") == "0 0 400 300"
    assert "<script" not in svg and "href" not in svg
    plot = root.find(SVG + "rect")
    x0, y0 = float(plot.get("x")), float(plot.get("y"))
    w, h = float(plot.get("width")), float(plot.get("height"))
    lines = root.findall(SVG + "polyline")
    # deletion: one line of 3 points; insertion: NaN breaks it, so [0] alone (no line) and [2, 3]
    assert [len(p.get("points").split()) for p in lines] == [3, 2]
    pts = [tuple(map(float, p.split(","))) for p in lines[0].get("points").split()]
    # values within [0, 1] use the [0, 1] range: 1 at the top, 0 at the bottom; x spans 0..3 (longest series)
    assert pts[0] == pytest.approx((x0, y0), abs=0.1)
    assert pts[1] == pytest.approx((x0 + w / 3, y0 + h / 2), abs=0.1)
    assert pts[2] == pytest.approx((x0 + 2 * w / 3, y0 + h), abs=0.1)
    assert lines[1].get("stroke-dasharray")
    assert len(root.findall(SVG + "circle")) == 3 + 3  # a marker per finite point
    for c in root.findall(SVG + "circle"):
        assert x0 - 0.1 <= float(c.get("cx")) <= x0 + w + 0.1 and y0 - 0.1 <= float(c.get("cy")) <= y0 + h + 0.1
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "deletion" in texts and "insertion" in texts and "accuracy" in texts
    # out of [0, 1]: the data range, padded; empty: a valid "no data" plot
    root = ET.fromstring(svg_line_plot([Series("logit", [-3.0, 10.0])]))
    ys = [float(v.split(",")[1]) for v in root.find(SVG + "polyline").get("points").split()]
    assert ys[0] > ys[1]
    root = ET.fromstring(svg_line_plot([Series("empty", [])]))
    assert any(t.text == "no data" for t in root.iter(SVG + "text"))


def test_sort_classes_by_held_out_fidelity():
    def entry(fid):
        return {"name": "x", "metrics": {"held_out": {} if fid is None else {"ice_fidelity": fid}}}

    classes = {"3": entry(0.2), "1": entry(None), "7": entry(0.05), "2": entry(float("nan")),
               "5": entry(0.2), "9": {"name": "no metrics"}}
    assert [cid for cid, _ in sort_classes(classes)] == [7, 3, 5, 1, 2, 9]
    assert held_out_fidelity(classes["7"]) == 0.05 and held_out_fidelity(classes["2"]) is None


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    assert cli_main(["report", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert default_out_dir(tmp_path / "b") == tmp_path / "b-report"


def _ordering_metrics(k: int = 3, kind: str = "sobol") -> dict:
    """A held-out split with the deletion/insertion results of both concept orderings (issue 12)."""
    return {"c_del": 0.6 if kind == "sobol" else 0.4, "c_ins": 0.9, "gini": 0.3, "importance_kind": kind,
            "c_del_contribution": 0.4, "c_ins_contribution": 0.8, "gini_contribution": 0.2,
            "c_del_sobol": 0.6, "c_ins_sobol": 0.9, "gini_sobol": 0.3,
            "deletion_curve": [1.0, 0.3, 0.1, 0.0], "insertion_curve": [0.0, 0.7, 1.0, 1.0],
            "deletion_curve_contribution": [1.0, 0.6, 0.2, 0.0], "insertion_curve_contribution": [0.0, 0.5, 0.9, 1.0],
            "deletion_curve_sobol": [1.0, 0.3, 0.1, 0.0], "insertion_curve_sobol": [0.0, 0.7, 1.0, 1.0],
            "contribution_importance": [2.0, 0.5, 1.0][:k], "sobol_importance": [0.1, 0.7, 0.2][:k],
            "importance": [0.1, 0.7, 0.2][:k]}


def test_report_shows_both_concept_orderings():
    from types import SimpleNamespace

    from conceptlens.precompute.report import _ClassRenderer, _curves_html, _metrics_table

    metrics = {"held_out": _ordering_metrics()}
    html_ = _curves_html(metrics)
    assert "by Sobol total order" in html_  # the chosen ordering names the curves
    assert html_.count("<svg") == 2 and "contribution order" in html_ and "Sobol order" in html_
    table = html_[html_.index("<table class=orderings>"):]
    for v in ("0.4", "0.8", "0.6", "0.9"):  # C-Del / C-Ins of both orderings
        assert f"<td>{v}</td>" in table
    assert table.index("mean contribution") < table.index("Sobol total order")
    # the metrics table keeps the chosen ordering's rows and leaves the per-ordering keys to that table
    mt = _metrics_table(metrics)
    assert "c_del_sobol" not in mt and "sobol_importance" not in mt and "deletion_curve_sobol" not in mt
    assert "higher is better" in mt[mt.index("(C-Del)"):mt.index("(C-Del)") + 400]
    # the concepts table: contribution and Sobol importance per concept, with their ranks
    cols = _ClassRenderer._importance_columns(SimpleNamespace(metrics=metrics, k=3))
    assert [h.split("<br>")[0] for h, _ in cols] == ["<th>contribution", "<th>Sobol importance"]
    assert cols[0][1][1] == {0: 1, 2: 2, 1: 3} and cols[1][1][1] == {1: 1, 2: 2, 0: 3}
    # an older bundle with one importance only
    old = {"train": {"importance": [1.0, 2.0]}}
    cols = _ClassRenderer._importance_columns(SimpleNamespace(metrics=old, k=2))
    assert len(cols) == 1 and "importance" in cols[0][0] and cols[0][1] == ([1.0, 2.0], None)
    assert "<table class=orderings>" not in _curves_html({"held_out": {"deletion_curve": [1.0, 0.0]}})


# ------------------------------------------------------------------------------------------------
# a real bundle, and the same bundle with the evaluation results that issue 4 adds


def _gaussian_codes(n: int, k: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(n, k, h, w) non-negative code maps: a blob per concept at a random place per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    codes = np.zeros((n, k, h, w), np.float32)
    for i in range(n):
        for j in range(k):
            cy, cx = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
            codes[i, j] = rng.uniform(0.2, 2.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)
    return codes


def augment_bundle(src: Path, dst: Path) -> dict:
    """Copy the bundle at ``src`` to ``dst`` and add, where the job did not write them, the evaluation results and
    example code maps of issue 4 (deletion/insertion curves, importance, stitched and shift tests,
    examples/<id>/codes and examples/<id>/<i>.jpg from the class's own prototype crops); one class
    is flagged. Checksums and bundle id are rewritten so the copy loads and verifies."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    bundle = load_bundle(dst)
    crop = bundle.preprocessing.crop
    _, fh, fw = bundle.feature_shape
    with safe_open(str(dst / "concepts.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    tensors = dict(bundle.tensors)
    ids = sorted(bundle.classes)
    flagged = ids[-1]
    for n, cid in enumerate(ids):
        info = manifest["classes"][str(cid)]
        cc = bundle.classes[cid]
        k = cc.k
        ho = info["metrics"].setdefault("held_out", {})
        ho.setdefault("accuracy_reconstructed", 0.9 - 0.01 * n)
        ho.setdefault("c_del", 0.3 + 0.01 * n)
        ho.setdefault("c_ins", 0.7)
        ho.setdefault("gini", 0.4)
        ho.setdefault("stability", 0.8)
        ho.setdefault("deletion_curve", [1.0 - i / k for i in range(k + 1)])
        ho.setdefault("insertion_curve", [(i / k) ** 0.5 for i in range(k + 1)])
        ho.setdefault("importance", [float(x) for x in np.linspace(1.0, 0.2, k)])
        for key, v in _ordering_metrics().items():  # both concept orderings (issue 12)
            if key.endswith("importance"):
                v = [float(x) for x in np.linspace(1.0, 0.2, k)[::-1 if key.startswith("sobol") else 1]]
            elif "curve" in key:
                v = [1.0 - i / k for i in range(k + 1)] if key.startswith("deletion") else [(i / k) ** 0.5 for i in range(k + 1)]
            ho.setdefault(key, v)
        info["metrics"].get("train", {}).setdefault("deletion_curve", [1.0 - 0.8 * i / k for i in range(k + 1)])
        info["metrics"].setdefault("stitched", {"pass": cid != flagged, "predicted": cid if cid != flagged else ids[0],
                                                "predicted_name": bundle.class_names[cid if cid != flagged else ids[0]],
                                                "probability": 0.61, "pass_excluding_class": cid != flagged})
        info["metrics"].setdefault("shift", {"pairs": [
            {"target": t, "target_name": bundle.class_names[t], "max_probability": 0.8, "baseline_probability": 0.1}
            for t in ids[:2] if t != cid]})
        if cid == flagged and "stitched_test_failed" not in info["flags"]:
            info["flags"].append("stitched_test_failed")
        if n < 2 and f"examples/{cid}/codes" not in tensors:
            crops = [r.file for refs in cc.prototypes for r in refs][:3]
            for i, rel in enumerate(crops):
                p = dst / "examples" / str(cid) / f"{i}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.open(dst / rel).convert("RGB").resize((crop, crop)).save(p, quality=90)
            tensors[f"examples/{cid}/codes"] = _gaussian_codes(len(crops), k, fh, fw, seed=cid)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(dst / "concepts.safetensors"),
              metadata=meta)
    files = {str(p.relative_to(dst)): sha256_file(p) for p in sorted(dst.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    manifest["files"], manifest["bundle_id"] = files, compute_bundle_id(files)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    load_bundle(dst)  # verifies
    return manifest


@pytest.fixture(scope="module")
def reports(cifar_bundle, tmp_path_factory):
    """{"plain": (report dir, manifest, bundle dir), "full": (...)}, written through the CLI."""
    root = tmp_path_factory.mktemp("report")
    full_bundle = root / "full-bundle"
    full_manifest = augment_bundle(cifar_bundle, full_bundle)
    out = {}
    for name, bundle in (("plain", cifar_bundle), ("full", full_bundle)):
        dest = root / f"{name}-report"
        assert cli_main(["report", str(bundle), "--out", str(dest)]) == 0
        out[name] = (dest, json.loads((bundle / "manifest.json").read_text()), bundle)
    assert full_manifest == out["full"][1]
    # writing again replaces the earlier report; a directory that is not a report is left alone
    dest = out["full"][0]
    (dest / "stale.txt").write_text("from the previous report")
    assert write_report(full_bundle, dest) == dest and not (dest / "stale.txt").exists()
    assert (dest / MARKER).is_file() and not list(root.glob(".full-report.*"))
    other = root / "not-a-report"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert cli_main(["report", str(full_bundle), "--out", str(other)]) == 2
    assert (other / "keep.txt").is_file()
    return out


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet; requests are recorded instead
        pass

    def log_request(self, code="-", size="-"):
        self.server.requests.append((urllib.parse.unquote(self.path.split("?")[0]), int(code)))


@pytest.fixture(scope="module")
def server(reports):
    """Both reports served over HTTP on a free local port: yields the base URL; records requests."""
    root = reports["full"][0].parent
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class _Refs(html.parser.HTMLParser):
    """img src, link href (stylesheets) and a href of a page."""

    def __init__(self):
        super().__init__()
        self.imgs, self.css, self.links = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src"))
        elif tag == "link" and a.get("rel") == "stylesheet":
            self.css.append(a.get("href"))
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])


def _refs(page_html: str) -> _Refs:
    p = _Refs()
    p.feed(page_html)
    return p


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200, url
        return r.read()


def _check_images_over_http(base: str, page_url: str, srcs: list[str]) -> None:
    for src in srcs:
        assert src and not src.startswith(("http:", "https:", "//", "/", "data:", "file:")), src  # relocatable
        data = _fetch(urllib.parse.urljoin(page_url, src))
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.width > 8 and im.height > 8, src


def test_report_files_and_images(reports, server):
    """Without a browser: every page's links resolve inside the report, every image is served and decodes."""
    httpd, base = server
    for name, (dest, manifest, _) in reports.items():
        pages = sorted(p.name for p in dest.glob("*.html"))
        assert pages == sorted(["index.html"] + [f"class-{c}.html" for c in manifest["classes"]])
        for page in pages:
            url = f"{base}/{dest.name}/{page}"
            refs = _refs(_fetch(url).decode())
            assert refs.css == ["style.css"]
            for href in refs.links:
                assert (dest / href).is_file(), (page, href)
            _check_images_over_http(base, url, refs.imgs)
    full = reports["full"][0]
    ex = sorted((full / "img").glob("*/ex*_c*.jpg"))
    assert ex, "the example heatmaps were not rendered"
    # an overlay is the example image with color added where the concept is
    with Image.open(ex[0]) as over, Image.open(ex[0].with_name(ex[0].name.split("_c")[0] + ".jpg")) as plain:
        diff = np.abs(np.asarray(over, np.int16) - np.asarray(plain, np.int16)).mean(axis=2)
        assert (diff > 30).mean() > 0.01 and (diff < 8).mean() > 0.3


def _chromium(args: list[str], profiles: Path, timeout: int = 90) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile (no cache: every resource is fetched again)."""
    profiles.mkdir(parents=True, exist_ok=True)
    user_data = profiles / f"profile-{len(list(profiles.iterdir()))}"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={user_data}",
           "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _dump_dom(url: str, user_data: Path) -> str:
    return _chromium(["--dump-dom", url], user_data).stdout


def test_report_in_headless_chromium(reports, server, tmp_path):
    """Index and class pages of both reports load in Chromium with their content, every image the
    DOM references was fetched by the browser itself (200) and decodes, and a screenshot is not blank."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to run this test")
    httpd, base = server
    user_data = tmp_path / "chromium-profile"
    for name, (dest, manifest, bundle) in reports.items():
        classes = manifest["classes"]
        order = [cid for cid, _ in sort_classes(classes)]
        index_url = f"{base}/{dest.name}/index.html"
        del httpd.requests[:]
        dom = _dump_dom(index_url, user_data)
        assert "conceptlens evaluation report" in dom and manifest["model"]["name"] in dom
        assert manifest["method"]["name"] in dom and manifest["bundle_id"] in dom
        # every class, linked, in order of held-out ICE fidelity; the flagged ones marked with their flags
        links = [h for h in _refs(dom).links if h.startswith("class-")]
        assert links == [f"class-{c}.html" for c in order]
        for cid in order:
            info = classes[str(cid)]
            assert info["name"] in dom
            for flag in info["flags"]:
                assert f"<span class=\"flag\">{flag}</span>" in dom
        assert ("⚑" in dom) == any(info["flags"] for info in classes.values())
        # a class page: in the full bundle the class flagged by augment_bundle (the largest id), in the
        # plain one the first flagged class if any, else the best
        cid = max(order) if name == "full" else next((c for c in order if classes[str(c)]["flags"]), order[0])
        info = classes[str(cid)]
        page_url = f"{base}/{dest.name}/class-{cid}.html"
        del httpd.requests[:]
        dom = _dump_dom(page_url, user_data)
        fetched = dict(httpd.requests)
        assert info["name"] in dom and "Metrics" in dom and "Concepts" in dom
        for split in ("held_out", "train"):
            fid = info["metrics"].get(split, {}).get("ice_fidelity")
            if fid is not None:
                assert f"{fid:.4g}" in dom
        refs = _refs(dom)
        protos = json.loads((bundle / "prototypes.json").read_text()).get(str(cid), [])
        assert sum(1 for s in refs.imgs if "/p" in s) == sum(len(c) for c in protos) > 0
        assert refs.imgs, "no images on the class page"
        for src in refs.imgs:  # loaded by Chromium itself, with 200
            path = urllib.parse.urlparse(urllib.parse.urljoin(page_url, src)).path
            assert fetched.get(path) == 200, (src, fetched)
        _check_images_over_http(base, page_url, refs.imgs)
        assert fetched.get(f"/{dest.name}/style.css") == 200
        if name == "full":
            assert "Deletion and insertion curves" in dom and "<svg" in dom and "<polyline" in dom
            assert "Stitched-prototype test" in dom and "Hyperplane shifting test" in dom
            assert "stitched_test_failed" in dom
            assert "Sobol total order" in dom and "Sobol importance" in dom  # both concept orderings
            verdict = info["metrics"]["stitched"]["pass"]
            assert ("<span class=\"pass\">pass</span>" if verdict else "<span class=\"fail\">FAIL</span>") in dom
            # and a page with example heatmaps
            ex_cid = sorted(int(c) for c in classes)[0]
            ex_url = f"{base}/{dest.name}/class-{ex_cid}.html"
            del httpd.requests[:]
            dom = _dump_dom(ex_url, user_data)
            fetched = dict(httpd.requests)
            srcs = [s for s in _refs(dom).imgs if "/ex" in s]
            n_examples = load_bundle(bundle, verify=False).tensors[f"examples/{ex_cid}/codes"].shape[0]
            assert "Examples" in dom and len(srcs) == n_examples * (1 + classes[str(ex_cid)]["k"])
            for src in srcs:
                assert fetched.get(urllib.parse.urlparse(urllib.parse.urljoin(ex_url, src)).path) == 200, src
            # the screenshot shows the page: text, crops and heatmaps, not a blank canvas
            shot = tmp_path / "class.png"
            _chromium([f"--screenshot={shot}", "--window-size=1280,2200", ex_url], user_data)
            with Image.open(shot) as im:
                px = np.asarray(im.convert("RGB"), np.int16)
            assert px.shape[:2] == (2200, 1280)
            non_white = (px.min(axis=2) < 235).mean()
            saturated = ((px.max(axis=2) - px.min(axis=2)) > 80).mean()  # colored heatmaps, bars, links
            assert non_white > 0.05 and saturated > 0.002, (non_white, saturated)
            assert len(np.unique(px.reshape(-1, 3), axis=0)) > 500


# ------------------------------------------------------------------------------------------------
# an index of 1000 classes: compact, and searchable, sortable and filterable from the URL

ADJECTIVES = ["amber", "brisk", "coral", "dusky", "eager", "fuzzy", "golden", "hazel", "icy", "jade",
              "khaki", "lunar", "misty", "noble", "olive", "plush", "quiet", "rusty", "sandy", "tawny"]
NOUNS = ["ant", "bat", "bear", "bee", "boar", "bull", "carp", "cat", "cod", "colt", "crab", "crow", "deer", "dog",
         "dove", "duck", "eel", "elk", "emu", "fawn", "finch", "fox", "frog", "gnat", "goat", "goose", "gull",
         "hare", "hawk", "hen", "ibis", "jay", "kite", "lark", "lion", "lynx", "mole", "moth", "mule", "newt",
         "owl", "ox", "pig", "pike", "ram", "rat", "seal", "swan", "toad", "wolf"]


def write_many_class_bundle(out: Path, n: int = 1000, seed: int = 0) -> Path:
    """A loadable bundle of ``n`` classes ("<Adjective> <noun>", all distinct) with tiny random bases,
    one prototype crop per concept, varied held-out metrics, flags and stitched-test results (``pass`` and
    ``pass_excluding_class``; ``pass_rate`` on every 7th class; none on every 10th). No real model: the
    report never runs it."""
    from conceptlens.precompute.bundle_writer import write_bundle
    from conceptlens.service.manifest import ClassEntry, HeadCard, MethodCard, ModelCard, Preprocessing

    from service_conftest import jpeg_bytes

    assert n <= len(ADJECTIVES) * len(NOUNS)
    rng = np.random.default_rng(seed)
    c = 8
    names = [f"{ADJECTIVES[i // len(NOUNS)].capitalize()} {NOUNS[i % len(NOUNS)]}" for i in range(n)]
    model_file = out.parent / "not-a-model.onnx"
    model_file.parent.mkdir(parents=True, exist_ok=True)
    model_file.write_bytes(b"the report does not run the model")
    jpeg = jpeg_bytes(seed, (32, 32))
    classes, tensors, protos, jpegs = {}, {}, {}, {}
    for cid in range(n):
        k = 2 + cid % 3
        basis = np.abs(rng.standard_normal((k, c))).astype(np.float32)
        tensors[f"basis/{cid}"], tensors[f"weights/{cid}"] = basis, rng.standard_normal(k).astype(np.float32)
        fid = float(rng.uniform(0.02, 0.45))
        metrics = {"held_out": {"ice_fidelity": fid, "top1_agreement": float(rng.uniform(0.7, 1.0)),
                                "recon_error": float(rng.uniform(0.1, 0.5)), "c_del": float(rng.uniform(0.2, 0.8))},
                   "train": {"ice_fidelity": fid * 0.9}}
        flags = []
        if cid % 10 != 9:
            st = {"pass": bool(rng.random() < 0.8), "pass_excluding_class": bool(rng.random() < 0.6),
                  "predicted": cid, "probability": 0.5}
            if cid % 7 == 0:
                st["pass_rate"] = float(np.round(rng.uniform(0, 1), 2))
            metrics["stitched"] = st
            if not st["pass"]:
                flags.append("failed_stitched_prototype_test")
        if fid > 0.3:
            flags.append("low_fidelity")
        images = 40 + cid % 17
        classes[cid] = ClassEntry(name=names[cid], k=k, method="nmf", images=images, images_seen=images,
                                  held_out_images=images // 5, metrics=metrics, flags=flags)
        protos[cid] = []
        for j in range(k):
            rel = f"prototypes/{cid}/{j}_0.jpg"
            jpegs[rel] = jpeg
            protos[cid].append([{"file": rel, "source": f"train/{cid}/{j}", "box": [0, 0, 32, 32], "score": 0.9}])
    fc_w = np.abs(rng.standard_normal((n, c))).astype(np.float32)
    return write_bundle(out, model_onnx=model_file,
                        model=ModelCard(source="onnx:not-a-model.onnx", name="synthetic-1000", file_sha256="",
                                        layer="features", feature_shape=(c, 7, 7), num_classes=n,
                                        head=HeadCard("linear", "head.safetensors")),
                        class_names=names, preprocessing=Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3),
                        head_weight=fc_w, head_bias=np.zeros(n, np.float32), head_onnx=None, classes=classes,
                        tensors=tensors, prototypes=protos, prototype_jpegs=jpegs, method=MethodCard("nmf", {}))


class _Rows(html.parser.HTMLParser):
    """The index's class rows as dumped by the browser: [(class id, visible)] in DOM order, and the count line."""

    def __init__(self):
        super().__init__()
        self.rows, self.count, self._in_rows, self._in_count = [], "", False, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tbody" and a.get("id") == "rows":
            self._in_rows = True
        elif tag == "tr" and self._in_rows:
            self.rows.append((int(a["data-id"]), "hidden" not in a))
        self._in_count = a.get("id") == "count"

    def handle_endtag(self, tag):
        self._in_count = False
        if tag == "tbody":
            self._in_rows = False

    def handle_data(self, data):
        if self._in_count:
            self.count += data


def _rows(dom: str) -> _Rows:
    p = _Rows()
    p.feed(dom)
    return p


@pytest.fixture(scope="module")
def big_report(tmp_path_factory):
    """(report dir, manifest classes by int id, seconds write_report took) of the 1000-class bundle."""
    import time

    root = tmp_path_factory.mktemp("big")
    bundle = write_many_class_bundle(root / "bundle")
    t0 = time.perf_counter()
    dest = write_report(bundle, root / "report")
    seconds = time.perf_counter() - t0
    classes = {int(k): v for k, v in json.loads((bundle / "manifest.json").read_text())["classes"].items()}
    return dest, classes, seconds


def test_index_of_1000_classes_is_compact(big_report):
    """One compact row per class, no images and nothing from the network on the index; a page per class."""
    dest, classes, seconds = big_report
    index = (dest / "index.html").read_text()
    size = (dest / "index.html").stat().st_size
    print(f"\n1000-class report written in {seconds:.2f} s; index.html {size / 1e6:.3f} MB")
    assert size < 1.5e6, size
    assert len(list(dest.glob("class-*.html"))) == len(classes) == 1000
    refs = _refs(index)
    assert refs.imgs == [] and "<img" not in index and refs.css == ["style.css"]
    assert [h for h in refs.links if h.startswith("class-")] == [f"class-{c}.html" for c, _ in sort_classes(
        {str(k): v for k, v in classes.items()})]
    assert not any(h.startswith(("http:", "https:", "//", "/")) for h in refs.links)
    assert "<script src" not in index and "http://" not in index.replace("http://www.w3.org", "")
    assert index.count("<tr ") == 1000


@pytest.mark.slow  # about 14 s: eight Chromium launches
def test_index_of_1000_classes_search_sort_filter_in_chromium(big_report, tmp_path):
    """In headless Chromium, a view given by the URL (#... or ?...) leaves exactly the matching rows
    visible, in the asked order; without one, every class shows in order of held-out fidelity."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to run this test")
    dest, classes, _ = big_report
    url = (dest / "index.html").as_uri()
    profiles = tmp_path / "chromium"
    by_fid = [c for c, _ in sort_classes({str(k): v for k, v in classes.items()})]

    def view(suffix: str) -> tuple[list[int], list[int], str]:
        """(visible ids in DOM order, all ids in DOM order, the count line) of index.html<suffix>."""
        p = _rows(_dump_dom(url + suffix, profiles))
        assert len(p.rows) == 1000
        return [c for c, v in p.rows if v], [c for c, _ in p.rows], p.count

    visible, order, count = view("")
    assert visible == order == by_fid and count == "all 1000 classes shown"
    # search by name, case-insensitive (hash form), in fidelity order
    visible, _, count = view("#q=gOLDEN")
    expected = [c for c in by_fid if classes[c]["name"].startswith("Golden ")]
    assert visible == expected and len(expected) == 50 and count == "50 of 1000 classes shown"
    # search by id (query form): only that class, no name contains the digits
    visible, _, count = view("?q=417")
    assert visible == [417] and count == "1 of 1000 classes shown"
    # no flags, by name descending
    visible, order, _ = view("#flag=none&sort=name&dir=desc")
    expected = sorted((c for c in classes if not classes[c]["flags"]), key=lambda c: classes[c]["name"], reverse=True)
    assert visible == expected and 100 < len(expected) < 900
    assert [c for c in order if c in set(expected)] == expected
    # one flag, and stitched failed, by stitched-test result (pass_rate where recorded, else the share of
    # the two verdicts passed) descending; classes without a stitched test last, in either direction
    def score(c):
        st = classes[c]["metrics"]["stitched"]
        return st["pass_rate"] if "pass_rate" in st else (st["pass"] + st["pass_excluding_class"]) / 2

    visible, order, _ = view("#flag=low_fidelity&st=fail&sort=st&dir=desc")
    expected = sorted((c for c in by_fid if "low_fidelity" in classes[c]["flags"]
                       and classes[c]["metrics"].get("stitched", {}).get("pass") is False), key=lambda c: -score(c))
    assert visible == expected and len({score(c) for c in expected}) > 2
    assert order[-100:] == [c for c in by_fid if "stitched" not in classes[c]["metrics"]]  # not run: last, stably
    # stitched test not run, by k descending then (stably) by fidelity
    visible, _, _ = view("#st=none&sort=k&dir=desc")
    expected = sorted((c for c in by_fid if "stitched" not in classes[c]["metrics"]), key=lambda c: -classes[c]["k"])
    assert visible == expected and len(expected) == 100
    # a query that matches nothing says so
    dom = _dump_dom(url + "#q=zebra", profiles)
    assert [c for c, v in _rows(dom).rows if v] == [] and "0 of 1000 classes shown" in dom
    # the page renders: controls, table rows, links, flags
    shot = tmp_path / "index.png"
    _chromium([f"--screenshot={shot}", "--window-size=1280,1000", url + "#flag=any&sort=name"], profiles)
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), np.int16)
    assert px.shape[:2] == (1000, 1280)
    assert (px.min(axis=2) < 235).mean() > 0.03 and ((px.max(axis=2) - px.min(axis=2)) > 60).mean() > 0.002
