"""Every ``--method`` with its defaults, through the command line and the service (issue 17).

The ground-truth world's small CNN (bench/ground_truth_world.py, trained here in seconds on real
rendered images of planted parts) is saved as TorchScript, as a user would; each method's bundle
is built by ``conceptlens precompute`` with nothing but the model, its preprocessing and the data
(every learner setting at its default: ``--concepts auto``, ``--face-lambda auto``, stability folds,
contrast, prototypes), then all five bundles are served by one ``conceptlens serve --repository``
process, and one Explain per class and method is checked against the model's own logits (torch,
computed here) and the identity sum(contributions) + residual + bias = logit.

The model sources (efficientnet-lite0, torchvision, timm, onnx, torchscript) are each proven end to
end in tests/test_model_sources.py, and the TorchServe runtime in tests/test_torchserve.py; this
module covers the learners.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from ground_truth_world import World, png_bytes, write_image_folder  # noqa: E402

METHODS = ("nmf", "seminmf", "face", "attribution", "directions")
PER_CLASS = 24  # precompute images a class (20 % held out by precompute itself)
MEAN = STD = (0.5, 0.5, 0.5)


def _to_input(images: np.ndarray) -> np.ndarray:
    x = (images.astype(np.float32) / 255.0 - np.float32(MEAN[0])) / np.float32(STD[0])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """(TorchScript path, labels file, ImageFolder, held-out samples, the torch model) of the world."""
    import torch

    from ground_truth import small_cnn

    world = World()
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("world")
    train = world.samples(80, seed=0)
    x = torch.from_numpy(_to_input(np.stack([s.image() for s in train])))
    y = torch.tensor([s.label for s in train])
    net = small_cnn(len(world.classes))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(4):  # a few epochs: the test needs a real trained model, not a good one
        net.train()
        for i in range(0, len(x), 64):
            loss = torch.nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    path = d / "world-cnn.pt"
    with torch.no_grad():
        torch.jit.trace(net, torch.zeros(1, 3, world.size, world.size)).save(str(path))
    labels = d / "labels.txt"
    labels.write_text("\n".join(world.class_names) + "\n")
    folder = write_image_folder(world.samples(PER_CLASS, seed=1000), world.class_names, d / "train")
    held = [next(s for s in world.samples(3, seed=2000 + c) if s.label == c) for c in range(len(world.classes))]
    return path, labels, folder, held, net, world


@pytest.mark.slow
def test_every_method_with_its_defaults_through_the_cli_and_the_service(world_model, tmp_path):
    import torch

    from conceptlens.service import cli
    from conceptlens.service.bundle import load_bundle
    from conceptlens.service.client import ExplainClient
    from conceptlens.service.serve_process import ServeProcess

    model_path, labels, folder, held, net, world = world_model
    repo = tmp_path / "repository"
    size = str(world.size)
    for method in METHODS:
        out = repo / method / "1"
        # only the model's description (preprocessing), the data and the method: every learner default
        args = ["precompute", "--model", f"torchscript:{model_path}", "--labels", str(labels), "--data", str(folder),
                "--group-by", "label", "--method", method, "--out", str(out), "--work", str(tmp_path / f"{method}.work"),
                "--resize", size, "--crop", size, "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--device", "cpu"]
        assert cli.main(args) == 0, method
        b = load_bundle(out)
        assert sorted(b.classes) == list(range(len(world.classes))), method
        assert b.manifest.method.name == method
        for cls, entry in b.classes.items():
            m = b.manifest.classes[cls].metrics
            assert entry.basis.shape[0] >= 1 and np.isfinite(entry.weights).all(), (method, cls)
            assert "held_out" in m and np.isfinite(m["held_out"]["ice_fidelity"]), (method, cls)
            if method == "face":  # lambda was chosen per class: a number, recorded with its sweep
                assert isinstance(m["selection"]["lambda"]["chosen"], float), m["selection"]
    manifest = json.loads((repo / "face" / "1" / "manifest.json").read_text())
    assert manifest["method"]["params"]["face_lambda"] == "auto"  # what the user asked is what is recorded

    with torch.no_grad():
        own = net(torch.from_numpy(_to_input(np.stack([s.image() for s in held])))).numpy().astype(np.float64)
    server = ServeProcess(None, "--no-concept-metrics", repository=repo, log=tmp_path / "serve.log")
    try:
        with ExplainClient(server.target) as client:
            for method in METHODS:  # the server is SERVING once any model is: wait for each
                client.wait_ready(timeout=180, service=method)
            assert sorted(m.name for m in client.list_models().models) == sorted(METHODS)
            for method in METHODS:
                for s, ref in zip(held, own):
                    cls = s.label
                    resp = client.explain(png_bytes(s.image()), model=method, classes=[cls],
                                          num_predictions=len(world.classes))
                    served = np.zeros(len(world.classes))
                    for p in resp.predictions:
                        served[p.class_id] = p.logit
                    scale = max(1.0, float(np.abs(ref).max()))
                    assert np.abs(served - ref).max() <= 1e-4 * scale, (method, served, ref)
                    (x,) = resp.explanations
                    assert x.class_id == cls and abs(x.logit - ref[cls]) <= 1e-4 * scale, (method, x.logit, ref)
                    assert x.concepts, (method, cls)
                    total = sum(c.contribution for c in x.concepts) + x.omitted_contribution + x.residual + x.bias
                    assert abs(total - x.logit) <= 1e-3 * scale, (method, total, x.logit)
    finally:
        assert server.stop(timeout=30) == 0
