"""Hostile input (issue 13), the short run for CI: hypothesis fuzzing of the image decoder, of
ExplainOptions and raw ExplainRequest bytes, of a bundle's manifest.json / prototypes.json, and
(slow: one server process) of the HTTP JSON body. Every outcome must be accepted or a typed client
error. The generators and the long run live in bench/fuzz.py.
"""
from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PIL on corrupt TIFF/EXIF
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conceptlens.v1 import explain_service_pb2 as pb  # noqa: E402

_spec = importlib.util.spec_from_file_location("conceptlens_bench_fuzz",
                                               Path(__file__).resolve().parents[1] / "bench" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fuzz
_spec.loader.exec_module(fuzz)

SEEDS = fuzz.image_seeds()
def fast(n: int):
    """Small, reproducible budgets for CI (the long run is bench/fuzz.py)."""
    return settings(max_examples=n, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True,
                    database=None)
OK = ("accepted", "client:")


def ok(outcome: str) -> bool:
    # "aspect": the known extreme-aspect-ratio blow-up, predicted and not run
    # (test_extreme_aspect_ratio_is_bounded holds it)
    return outcome.startswith(OK) or outcome == "aspect"


def outcome_of(call, *args) -> str:
    """The harness' outcome; the known contrast-in-top-k ValueError (test_contrast_among_top_k)
    counts as seen, anything else unclassified propagates."""
    return call(*args)


class _Ctx(fuzz.Ctx):
    def __init__(self, bundle_dir: Path, workdir: Path):
        super().__init__(workdir)
        self._bundle = bundle_dir


@pytest.fixture(scope="module")
def ctx(tiny_bundle, tmp_path_factory):
    c = _Ctx(tiny_bundle, tmp_path_factory.mktemp("fuzz"))
    c.model  # noqa: B018 - built once, outside the hypothesis deadline
    return c


# --- decoder -------------------------------------------------------------------------------------
@fast(400)
@given(seed=st.sampled_from(SEEDS), rnd=st.randoms(use_true_random=False))
def test_decoder_mutated_seeds(seed, rnd):
    data = fuzz.mutate_bytes(rnd, seed, SEEDS)
    assert ok(fuzz.run_decoder(data))


@fast(150)
@given(data=st.binary(max_size=512))
def test_decoder_random_bytes(data):
    if fuzz.predicted_blowup(data):
        return
    assert ok(fuzz.run_decoder(data))


@fast(100)
@given(w=st.sampled_from(fuzz.HUGE), h=st.sampled_from(fuzz.HUGE), kind=st.integers(0, 3))
def test_decoder_huge_declared_sizes(w, h, kind):
    data = [fuzz.png_declaring(w, h), fuzz.gif_declaring(w & 0xFFFF, h & 0xFFFF),
            fuzz.bmp_declaring(min(w, 2 ** 31 - 1), min(h, 2 ** 31 - 1)),
            fuzz.jpeg_declaring(SEEDS[0], w, h)][kind]
    if fuzz.predicted_blowup(data):
        return
    assert ok(fuzz.run_decoder(data))


def test_extreme_aspect_ratio_is_bounded(monkeypatch):
    """The resize before the crop must stay near the crop's size whatever the aspect ratio (or the
    image must be refused). Checked on 1 x 2000 (a harmless 196 MB) by watching PIL's resize."""
    from PIL import Image

    from conceptlens.service.manifest import Preprocessing
    from conceptlens.service.preprocess import ImageError, preprocess

    asked = []
    real = Image.Image.resize

    def spy(self, size, *a, **k):
        asked.append(size)
        if size[0] * size[1] > fuzz.RESIZE_BLOWUP * 224 * 224:
            raise MemoryError(f"resize to {size}")
        return real(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    try:
        preprocess(fuzz.png_declaring(1, 2000), Preprocessing(), max_pixels=fuzz.MAX_PIXELS)
    except ImageError:
        return
    assert all(w * h <= fuzz.RESIZE_BLOWUP * 224 * 224 for w, h in asked), asked


def test_contrast_among_top_k(ctx):
    from conceptlens.service.errors import InvalidInputError

    top = int(ctx.logits.argmax())
    opts = pb.ExplainOptions(top_k=10, contrast=pb.ClassRef(id=top))
    try:
        plan = ctx.model.plan(opts)
        ctx.model.answer_message(ctx.features, ctx.logits, plan, ctx.info)
    except InvalidInputError:
        pass  # a client error is fine; so would be explaining the others against it


# --- options and request bytes ---------------------------------------------------------------------
@fast(300)
@given(rnd=st.randoms(use_true_random=False))
def test_options(ctx, rnd):
    assert ok(o := outcome_of(fuzz.run_options, ctx, fuzz.gen_options(rnd, pb))) or o.startswith("known:")


@fast(200)
@given(top_k=st.integers(-(2 ** 31), 2 ** 31 - 1), max_concepts=st.integers(-(2 ** 31), 2 ** 31 - 1),
       protos=st.integers(-(2 ** 31), 2 ** 31 - 1), preds=st.integers(-(2 ** 31), 2 ** 31 - 1),
       heatmap=st.integers(-(2 ** 31), 2 ** 31 - 1), proto_format=st.integers(-(2 ** 31), 2 ** 31 - 1),
       ids=st.lists(st.integers(-(2 ** 31), 2 ** 31 - 1), max_size=4),
       names=st.lists(st.text(max_size=12), max_size=3))
def test_options_fields(ctx, top_k, max_concepts, protos, preds, heatmap, proto_format, ids, names):
    o = pb.ExplainOptions(top_k=top_k, max_concepts=max_concepts, prototypes_per_concept=protos,
                          num_predictions=preds, heatmap_format=heatmap, prototype_format=proto_format,
                          classes=[pb.ClassRef(id=i) for i in ids] + [pb.ClassRef(name=n) for n in names])
    assert ok(out := outcome_of(fuzz.run_options, ctx, o)) or out.startswith("known:")


@fast(150)
@given(rnd=st.randoms(use_true_random=False))
def test_request_bytes(ctx, rnd):
    assert ok(o := outcome_of(fuzz.run_request, ctx, fuzz.gen_request_bytes(rnd, pb, SEEDS))) or o.startswith("known:")


@fast(100)
@given(data=st.binary(max_size=300))
def test_request_random_bytes(ctx, data):
    assert ok(o := outcome_of(fuzz.run_request, ctx, data)) or o.startswith("known:")


# --- manifest / prototypes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mutant(ctx, tmp_path_factory):
    return fuzz.BundleMutator(ctx.bundle_dir, tmp_path_factory.mktemp("mutant") / "bundle")


@fast(150)
@given(rnd=st.randoms(use_true_random=False))
def test_manifest_mutations(mutant, rnd):
    assert ok(mutant.run(mutant.gen(rnd)))


@fast(60)
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                        max_leaves=10),
       which=st.sampled_from(["manifest", "prototypes"]))
def test_manifest_random_json(mutant, doc, which):
    m, p = json.dumps(mutant.manifest), json.dumps(mutant.protos)
    assert ok(mutant.run((json.dumps(doc), p) if which == "manifest" else (m, json.dumps(doc))))


@pytest.mark.parametrize("text", ["null", "[]", "5"])
def test_prototypes_json_not_an_object(mutant, text):
    assert ok(mutant.run((json.dumps(mutant.manifest), text)))


# --- HTTP (one server process) ---------------------------------------------------------------------
@pytest.mark.slow
def test_http_json_body(ctx):
    target = fuzz.HttpTarget(ctx)
    try:
        rng = random.Random(0)
        bad = []
        for i in range(150):
            body = fuzz.gen_http_body(rng, pb, SEEDS)
            outcome = target.run(body, 10.0)
            if not ok(outcome):
                bad.append((i, outcome, body[0][:200]))
        assert not bad, bad
    finally:
        target.close()
