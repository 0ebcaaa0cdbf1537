"""The precompute job end to end on the real model and real images (issue 2)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import nnls

from conftest import IMAGENET, cifar_test_jpegs, require_data, write_subset_shard

from conceptlens.service.bundle import BundleError, load_bundle
from conceptlens.service.explain import Explainer
from conceptlens.service.head import FD_EPS
from conceptlens.service.preprocess import preprocess_bytes
from conceptlens.service.runtime import open_session


CLI = [sys.executable, "-m", "conceptlens"]


def run_cli(*args, timeout=600, **kw):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.slow
def test_onnx_matches_torch_and_top1_on_imagenet_samples(cifar_bundle):
    """The exported model's logits equal torch's to 1e-4 relative; its top-1 on the ImageNet samples is printed."""
    import torch

    from conceptlens.precompute.models import load_model

    require_data()
    bundle = load_bundle(cifar_bundle)
    session = open_session(bundle.model_path, ["CPUExecutionProvider"])
    model = load_model("efficientnet-lite0")
    files = sorted(IMAGENET.glob("*.jpg"))
    x = np.stack([preprocess_bytes(f.read_bytes(), bundle.preprocessing)[0] for f in files[:16]])
    with torch.no_grad():
        ref = model.torch_head(model.features(torch.from_numpy(x))).numpy()
    _, logits = session.run(["features", "logits"], {"image": x})
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel
    correct = 0
    for i in range(0, len(files), 50):
        batch = np.stack([preprocess_bytes(f.read_bytes(), bundle.preprocessing)[0] for f in files[i:i + 50]])
        _, lg = session.run(["features", "logits"], {"image": batch})
        correct += sum(int(p) == int(f.name[:4]) for p, f in zip(lg.argmax(1), files[i:i + 50]))
    top1 = correct / len(files)
    print(f"\nONNX EfficientNet-Lite0 top-1 on {len(files)} ImageNet samples: {top1:.3f} (max rel. logit diff vs torch {rel:.2e})")
    assert top1 > 0.7


def test_bundle_loads_verifies_and_explains_held_out_images(cifar_bundle):
    bundle = load_bundle(cifar_bundle)
    assert bundle.classes, "the bundle has classes"
    man = bundle.manifest
    assert man.model.name == "efficientnet-lite0" and man.model.feature_shape == (1280, 7, 7)
    assert man.model.source == "efficientnet-lite0" and man.model.file_sha256 and man.method.name == "nmf"
    for cid, cc in bundle.classes.items():
        assert cc.basis.shape == (5, 1280) and (cc.basis >= 0).all()
        assert len(cc.prototypes) == 5 and all(len(p) == 3 for p in cc.prototypes)
        for concept in cc.prototypes:
            for ref in concept:
                assert (cifar_bundle / ref.file).is_file()
        m = man.classes[cid].metrics["held_out"]
        assert 0 <= m["recon_error"] < 1 and m["identity_max_error"] < 1e-3
    # Held-out images: the CIFAR-10 test shard, never seen by precompute.
    explainer = Explainer(bundle)
    session = open_session(bundle.model_path, ["CPUExecutionProvider"])
    imgs = cifar_test_jpegs(64)
    x = np.stack([preprocess_bytes(b, bundle.preprocessing)[0] for b in imgs])
    feats, logits = session.run(["features", "logits"], {"image": x})
    checked = 0
    for f, l in zip(feats, logits):
        for cid in bundle.classes:
            e = explainer.explain(f, l, cid)
            total = sum(c.contribution for c in e.concepts) + e.residual + e.bias
            assert abs(total - float(l[cid])) <= 1e-4 * max(1.0, abs(float(l[cid]))), (total, l[cid])
            assert all(c.presence >= 0 for c in e.concepts)
            assert e.concepts[0].heatmap.shape == (7, 7)
            checked += 1
    assert checked >= 64


def test_corrupted_bundle_is_refused_by_name(cifar_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(cifar_bundle, copy)
    target = next((copy / "prototypes").rglob("*.jpg"))
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(BundleError, match=str(target.relative_to(copy))):
        load_bundle(copy)
    (copy / "concepts.safetensors").unlink()
    with pytest.raises(BundleError, match="concepts.safetensors \\(missing\\)"):
        load_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(copy)


@pytest.mark.slow
def test_sigkill_halfway_then_rerun_resumes_without_redoing_classes(cifar_bundle_config, cifar_bundle, tmp_path):
    """Kill the learn stage after its first class, rerun: finished classes are kept, the bundle is valid."""
    cfg = cifar_bundle_config
    out, work = tmp_path / "bundle", tmp_path / "work"
    # Reuse the session bundle's extraction part so the test spends its time on learning.
    (work / "features").mkdir(parents=True)
    src_work = Path(str(cfg.out) + ".work")
    for f in ("config.json", "model.onnx"):
        (work / f).write_bytes((src_work / f).read_bytes())
    for p in (src_work / "features").iterdir():
        (work / "features" / p.name).write_bytes(p.read_bytes())
    args = ["precompute", "--model", cfg.model, "--data", cfg.data, "--out", out, "--work", work,
            "--concepts", cfg.concepts, "--min-images", cfg.min_images, "--max-images", cfg.max_images,
            "--prototypes", cfg.prototypes, "--device", "cpu"]
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    classes_dir = work / "classes"
    deadline = time.time() + 300
    while time.time() < deadline and not (classes_dir.is_dir() and any(classes_dir.glob("*.safetensors"))):
        time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in classes_dir.glob("*.safetensors")}
    assert done and not out.exists()
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert "done already, skipping" in res.stderr
    for name, stamp in done.items():
        p = classes_dir / name
        assert (p.stat().st_mtime_ns, p.stat().st_ino) == stamp, f"{name} was recomputed"
    bundle = load_bundle(out)
    assert len(bundle.classes) == len(load_bundle(cifar_bundle).classes)


def test_sharded_run_merges_into_one_bundle(cifar_bundle_config, cifar_bundle, tmp_path):
    """--shard 0/2 and 1/2 (extract by data, learn by class) then merge == the classes of one run."""
    cfg = cifar_bundle_config
    work, out = tmp_path / "work", tmp_path / "bundle"
    common = ["--model", cfg.model, "--data", cfg.data, "--work", work, "--out", out, "--concepts", cfg.concepts,
              "--min-images", cfg.min_images, "--max-images", cfg.max_images, "--prototypes", cfg.prototypes,
              "--device", "cpu"]
    for stage in ("extract", "learn"):
        for i in range(2):
            res = run_cli("precompute", *common, "--stage", stage, "--shard", f"{i}/2")
            assert res.returncode == 0, res.stderr
    res = run_cli("merge", work, "--out", out)
    assert res.returncode == 0, res.stderr
    merged, single = load_bundle(out), load_bundle(cifar_bundle)
    assert set(merged.classes) == set(single.classes)
    for cid in merged.classes:
        assert merged.manifest.classes[cid].images == single.manifest.classes[cid].images


def test_cli_bad_inputs_give_clear_messages(tmp_path, cifar_shard):
    res = run_cli("precompute", "--model", "efficientnet-lite0", "--data", tmp_path / "nope", "--out", tmp_path / "b")
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("precompute", "--model", "no-such-net", "--data", cifar_shard, "--out", tmp_path / "b")
    assert res.returncode == 2 and "unknown model 'no-such-net'" in res.stderr
    res = run_cli("precompute", "--model", "efficientnet-lite0", "--layer", "blocks.99", "--data", cifar_shard,
                  "--out", tmp_path / "b")
    assert res.returncode == 2 and "unknown layer 'blocks.99'" in res.stderr
    res = run_cli("precompute", "--model", "resnet18", "--layer", "nolayer", "--data", cifar_shard,
                  "--out", tmp_path / "b")
    assert res.returncode == 2 and "unknown layer 'nolayer'" in res.stderr and "layer4" in res.stderr
    res = run_cli("precompute", "--model", "efficientnet-lite0", "--group-by", "label", "--data", cifar_shard,
                  "--out", tmp_path / "b")
    assert res.returncode == 2 and "--group-by predicted" in res.stderr


def test_bad_image_is_skipped_and_counted_and_small_classes_are_reported(tmp_path):
    require_data()
    shard = write_subset_shard(tmp_path / "s.tar", 40, extra={"broken.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
                                                               "broken.cls": b"3"})
    out = tmp_path / "b"
    res = run_cli("precompute", "--model", "efficientnet-lite0", "--data", shard, "--out", out, "--min-images", "2",
                  "--max-images", "20", "--concepts", "2", "--prototypes", "1", "--stability-folds", "0",
                  "--device", "cpu")
    assert res.returncode == 0, res.stderr  # 40 images: some predicted class has 2 of them
    assert "skipping s.tar:broken" in res.stderr
    assert "1 skipped" in res.stderr
    assert "< --min-images 2 images: skipped" in res.stderr  # the classes with one image
    assert load_bundle(out).classes
    res = run_cli("precompute", "--model", "efficientnet-lite0", "--data", shard, "--out", tmp_path / "c",
                  "--min-images", "1000", "--work", tmp_path / "w2", "--device", "cpu")
    assert res.returncode == 2 and "no class has at least --min-images 1000" in res.stderr
    assert "< --min-images 1000 images: skipped; the largest:" in res.stderr


def test_torchvision_model_with_weights_file_and_non_linear_head(tmp_path):
    """resnet18 from a local weights file (weights_only), explained at layer3: the head (layer4, pool,
    fc) is not linear, so weights come from finite differences and the bundle carries head.onnx."""
    import torch
    import torchvision

    require_data()
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    shard = write_subset_shard(tmp_path / "s.tar", 60)
    out = tmp_path / "b"
    res = run_cli("precompute", "--model", "resnet18", "--weights", weights, "--layer", "layer3", "--data", shard,
                  "--out", out, "--min-images", "10", "--concepts", "3", "--prototypes", "1", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    bundle = load_bundle(out)
    assert bundle.head_kind == "generic" and bundle.feature_shape == (256, 14, 14)
    assert len(bundle.class_names) == 10
    head = open_session(out / "head.onnx", ["CPUExecutionProvider"])

    def h(a: np.ndarray) -> np.ndarray:
        return head.run(["logits"], {"features": np.ascontiguousarray(a, np.float32)})[0]
    explainer = Explainer(bundle, head=h)
    session = open_session(bundle.model_path, ["CPUExecutionProvider"])
    x = np.stack([preprocess_bytes(b, bundle.preprocessing)[0] for b in
                  [p.read_bytes() for p in sorted(IMAGENET.glob("*.jpg"))[:4]]])
    feats, logits = session.run(["features", "logits"], {"image": x})
    # head.onnx is the model's own tail: on the model's features it gives the model's logits
    np.testing.assert_allclose(h(feats), logits, rtol=1e-4, atol=1e-4 * float(np.abs(logits).max()))
    for cid, cc in bundle.classes.items():
        # the stored weights are the head's slope along each concept at the class's anchor: our own
        # central difference, with a step 3x precompute's (the head is piecewise linear: ReLUs)
        anchor = bundle.tensors[f"anchor/{cid}"][None]
        step = 3 * FD_EPS
        own = np.array([(h(anchor + step * p[:, None, None])[0, cid] - h(anchor - step * p[:, None, None])[0, cid])
                        / (2 * step) for p in cc.basis.astype(np.float32)])
        np.testing.assert_allclose(cc.weights, own, rtol=0, atol=0.05 * float(np.abs(own).max()))
    for f, l in zip(feats, logits):
        v = f.reshape(f.shape[0], -1).T.astype(np.float64)  # (HW, C)
        for cid, cc in bundle.classes.items():
            e = explainer.explain(f, l, cid)
            assert e.identity_error < 1e-4 * max(1.0, abs(e.target))  # by construction for this head; and:
            assert np.isfinite([c.weight for c in e.concepts]).all()
            # the split against the head run here on scipy's NNLS reconstruction S P
            s = np.array([nnls(cc.basis.T.astype(np.float64), row)[0] for row in v])
            at_recon = float(h((s @ cc.basis.astype(np.float64)).T.reshape(1, *f.shape))[0, cid])
            presence = s.mean(axis=0)
            scale = abs(float(l[cid])) + float(np.abs(presence * cc.weights).sum()) + abs(at_recon)
            assert e.target == pytest.approx(float(l[cid]))
            assert abs(e.residual - (float(l[cid]) - at_recon)) <= 1e-4 * max(1.0, scale), (e.residual, l[cid], at_recon)
            assert abs(e.bias - (at_recon - float(presence @ cc.weights))) <= 1e-4 * max(1.0, scale)
