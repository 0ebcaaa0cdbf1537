"""Prototype mining against an independent brute force: every crop of every image scored on its own
(scipy's NNLS for the code, a plain cosine), sorted, one crop per image; and the stitched test's
picks when a class has fewer concepts than places."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import nnls
from scipy.special import softmax

from conceptlens.precompute.checks import stitch_picks
from conceptlens.precompute.features import Record
from conceptlens.precompute.prototypes import RecordPool, head_on_windows, mine_classes
from conceptlens.precompute.windows import window_means


def served_code(basis, v, u=None, alpha=0.0):
    """scipy's NNLS of window mean v (C,) on basis (k, C); with the head row u and alpha > 0 the
    logit-aware problem (service/nnls.py) written as one least squares on C + 1 rows."""
    a, y = basis.T.astype(np.float64), v
    if alpha:
        root = np.sqrt(alpha / (u @ u))
        a, y = np.vstack([a, root * (basis.astype(np.float64) @ u)[None]]), np.append(v, root * (v @ u))
    return nnls(a, y)[0]


def brute_force(records, basis, cls, m, ranking, exclude, cells, head=None, alpha=0.0):
    scores = []
    u = None if head is None else head[0][cls].astype(np.float64)
    for r in records:
        if exclude and r.predicted == cls:
            continue
        for w, v in enumerate(window_means(r.features[None], cells)[0].astype(np.float64)):
            if ranking == "code":
                s = served_code(basis, v, u, alpha)
            elif ranking == "evidence":  # the code times the head's softmax probability of the class
                s = served_code(basis, v, u, alpha) * softmax(head[0] @ v + head[1])[cls]
            else:
                s = basis @ v / (np.linalg.norm(basis, axis=1) * np.linalg.norm(v) + 1e-12)
            scores.append((s, r.key, w))
    out = []
    for j in range(len(basis)):
        ranked = sorted(scores, key=lambda t: (-t[0][j], t[1], t[2]))
        chosen, used = [], set()
        for s, key, w in ranked:
            if key not in used:
                chosen.append((key, w, s[j]))
                used.add(key)
            if len(chosen) == m:
                break
        out.append(chosen)
    return out


@pytest.mark.parametrize("block,alpha", [(3, 0.0), (64, 0.0), (3, 100.0)])  # many blocks and one; logit-aware codes
def test_mined_crops_are_the_brute_force_top(block, alpha):
    rng = np.random.default_rng(3)
    classes = (0, 1, 2)
    records = []
    for i in range(24):
        feats = np.abs(rng.standard_normal((16, 6, 6))).astype(np.float32) * rng.uniform(0.2, 2.0)
        records.append(Record(f"img-{i:03d}", feats, int(i % 3), None, b""))
    bases = {c: np.abs(rng.standard_normal((2 + c, 16))).astype(np.float32) for c in classes}
    head = (rng.standard_normal((3, 16)).astype(np.float32), rng.standard_normal(3).astype(np.float32))
    pool = RecordPool(records, cells=2, block=block)
    mined = mine_classes(pool, bases, m=4, window_logits=head_on_windows(*head),
                         logit_rows={c: head[0][c] for c in classes} if alpha else None, logit_weight=alpha)
    for c in classes:
        for ranking in ("evidence", "code", "cosine"):
            for exclude in (False, True):
                want = brute_force(records, bases[c], c, 4, ranking, exclude, cells=2, head=head, alpha=alpha)
                got = mined[c][(ranking, exclude)]
                assert len(got) == len(bases[c])
                for j, (g, w) in enumerate(zip(got, want)):
                    assert [(x.ref.key, x.window) for x in g] == [(k, win) for k, win, _ in w], (c, ranking, exclude, j)
                    np.testing.assert_allclose([x.score for x in g], [s for _, _, s in w], rtol=2e-3, atol=1e-4)
                    if exclude:
                        assert all(x.ref.predicted != c for x in g)


def test_evidence_ranking_needs_the_head_and_a_non_linear_head_reads_windows_as_whole_maps():
    rng = np.random.default_rng(5)
    records = [Record(f"img-{i}", np.abs(rng.standard_normal((8, 4, 4))).astype(np.float32), i % 2, None, b"")
               for i in range(6)]
    mined = mine_classes(RecordPool(records), {0: np.abs(rng.standard_normal((2, 8))).astype(np.float32)}, m=2)[0]
    assert {r for r, _ in mined} == {"code", "cosine"}  # no head: no evidence ranking
    w, b = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    v = np.abs(rng.standard_normal((300, 8))).astype(np.float32)
    pooled = head_on_windows(None, None, lambda f: f.mean(axis=(2, 3)) @ w.T + b, (4, 4), chunk=64)
    flat = head_on_windows(None, None, lambda f: f.reshape(len(f), -1) @ np.repeat(w, 16, axis=1).T / 16 + b, (4, 4))
    want = np.stack([w @ x + b for x in v])  # row by row
    np.testing.assert_allclose(pooled(v), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flat(v), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head_on_windows(w, b)(v), want, rtol=1e-4, atol=1e-4)


def test_stitch_picks_fill_every_place():
    per = [[f"a{r}" for r in range(3)], [f"b{r}" for r in range(3)], [f"c{r}" for r in range(3)]]
    assert stitch_picks(per, [2, 0, 1], 4) == ["c0", "a0", "b0", "c1"]
    assert stitch_picks(per, [1, 0, 2, 3][:3], 2) == ["b0", "a0"]
    assert stitch_picks([["a0"], []], [0, 1], 4) == ["a0"]  # what there is, no more


def test_extraction_spilled_past_its_memory_budget_keeps_the_same_images(tmp_path):
    """An extract shard that writes its maps out every 8 records (1 MiB) gives the learn stage the
    very records and windows of one that holds them all: each class's bottom-k over all files."""
    from conftest import require_data, write_subset_shard

    from conceptlens.precompute.features import safetensors_info
    from conceptlens.precompute.job import Job, PrecomputeConfig

    require_data()
    shard = write_subset_shard(tmp_path / "d.tar", 120)
    stores = {}
    for budget in (1024, 1):
        cfg = PrecomputeConfig(model="efficientnet-lite0", data=str(shard), out=str(tmp_path / f"b{budget}"),
                               work=str(tmp_path / f"w{budget}"), group_by="label", min_images=2, max_images=6,
                               device="cpu", extract_memory_mib=budget, batch_size=8)
        job = Job(cfg)
        part = job.extract()
        stores[budget] = (job.load_records()[0], safetensors_info(part)["spills"])
    (big, no_spills), (small, spills) = stores[1024], stores[1]
    assert not no_spills and len(spills) >= 5
    assert sorted(big) == sorted(small) and big.totals["seen"] == small.totals["seen"]
    for cls in big:
        a, b = big[cls], small[cls]
        assert [r.key for r in a] == [r.key for r in b] and len(a) == 6
        for ra, rb in zip(a, b):
            assert np.array_equal(ra.features, rb.features) and ra.view_jpeg == rb.view_jpeg
    wa = np.concatenate([blk.vectors for blk in big.window_blocks(16)])
    wb = np.concatenate([blk.vectors for blk in small.window_blocks(16)])
    assert np.array_equal(wa, wb)


def test_fitted_cells_cover_the_concepts_blob_within_one_to_two_windows():
    from conceptlens.precompute.windows import cells_box, fitted_cells, window_boxes

    m = np.zeros((7, 7), np.float32)
    m[1:4, 2:6] = 1.0  # a 3 x 4 blob
    m[2, 3] = 2.0  # its peak, in window (1, 1) of the 3 x 3 grid of 2-cell windows (cells 2..3)
    m[6, 6] = 1.5  # another, unconnected blob
    assert fitted_cells(m, window=4, cells=2) == (1, 2, 4, 6)
    # a lone cell: the window's size around it, kept inside the map
    one = np.zeros((7, 7), np.float32)
    one[0, 0] = 1.0
    assert fitted_cells(one, window=0, cells=2) == (0, 0, 2, 2)
    # a blob over the whole map: at most twice the window, centred on the peak
    big = np.ones((7, 7), np.float32)
    big[3, 3] = 2.0
    assert fitted_cells(big, window=4, cells=2) == (1, 1, 5, 5)
    # all zero: the window itself; in pixels, the window box of window_boxes
    assert fitted_cells(np.zeros((7, 7)), window=8, cells=2) == (4, 4, 6, 6)
    assert cells_box((4, 4, 6, 6), 7, 7, 224) == list(window_boxes(7, 7, 2, 224)[8])


def test_fitted_crops_follow_the_concepts_blob_in_the_source_image():
    """fit_boxes: a concept planted over a 3 x 4 block of one image's cells; its mined crop (a
    2 x 2-cell window inside the block) is cut to the whole block, scipy's NNLS code map deciding."""
    from conceptlens.precompute.prototypes import FITTED, fit_boxes
    from conceptlens.precompute.windows import cells_box

    rng = np.random.default_rng(5)
    basis = np.abs(rng.standard_normal((2, 16))).astype(np.float32) * (rng.random((2, 16)) < 0.5)
    basis[0, :8], basis[1, 8:] = 0, 0  # two disjoint directions
    records = []
    for i in range(6):
        f = 0.01 * np.abs(rng.standard_normal((16, 6, 6))).astype(np.float32)
        if i == 2:
            f[:, 1:4, 1:5] += 3 * basis[0][:, None, None]
        records.append(Record(f"img-{i}", f, 0, None, b""))
    pool = RecordPool(records, cells=2)
    mined = mine_classes(pool, {0: basis}, m=2)[0]
    top = mined[("code", False)][0][0]
    assert top.ref.key == "img-2" and top.window == 4  # the one window wholly inside the planted block
    fitted = fit_boxes(mined, basis, pool, (6, 6), cells=2, view_size=96)
    crop = fitted[(f"code/{FITTED}", False)][0][0]
    assert (crop.ref, crop.window) == (top.ref, top.window)
    assert list(crop.box) == cells_box((1, 1, 4, 5), 6, 6, 96)
    assert fitted[("code", False)] is mined[("code", False)]  # the window crops stay as mined


def test_streamed_safetensors_reads_back_as_the_library_writes_it(tmp_path):
    """The merge's streamed concepts.safetensors: the safetensors library loads every tensor as it was
    given (its own reader, not ours), the JPEG files land beside it, a tensor out of its spec is refused."""
    from safetensors.numpy import load_file

    from conceptlens.precompute.bundle_writer import StreamedTensors, write_safetensors_streamed

    rng = np.random.default_rng(0)
    arrays = {"basis/0": rng.random((3, 5), np.float32), "samples/0": rng.random((7, 5)).astype(np.float16),
              "weights/0": rng.random(3, np.float32), "codes": np.arange(6, dtype=np.int64).reshape(2, 3),
              "jpeg": np.frombuffer(b"\xff\xd8abc", np.uint8)}
    specs = {k: (v.dtype, v.shape) for k, v in arrays.items()}

    def items():
        for k, v in arrays.items():
            yield "tensor", k, v
            if k == "basis/0":
                yield "file", "prototypes/0/0_0.jpg", b"jpeg bytes"
    write_safetensors_streamed(tmp_path / "c.safetensors", StreamedTensors(specs, items), tmp_path)
    back = load_file(str(tmp_path / "c.safetensors"))
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    assert (tmp_path / "prototypes/0/0_0.jpg").read_bytes() == b"jpeg bytes"

    def wrong():
        yield "tensor", "basis/0", arrays["basis/0"][:2]
    with pytest.raises(ValueError, match="does not match"):
        write_safetensors_streamed(tmp_path / "d.safetensors", StreamedTensors(specs, wrong), tmp_path)
    with pytest.raises(ValueError, match="ended before"):
        write_safetensors_streamed(tmp_path / "e.safetensors", StreamedTensors(specs, lambda: iter(())), tmp_path)


@pytest.mark.parametrize("field, value", [("prototype_box", "fited"), ("prototype_ranking", "cosin")])
def test_an_unknown_prototype_setting_is_refused_before_anything_runs(tmp_path, field, value):
    from conceptlens.precompute.config import JobError, PrecomputeConfig
    from conceptlens.precompute.job import Job

    cfg = PrecomputeConfig(model="efficientnet-lite0", data=str(tmp_path), out=str(tmp_path / "b"), **{field: value})
    with pytest.raises(JobError, match=value):
        Job(cfg)
