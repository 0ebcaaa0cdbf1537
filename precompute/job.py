"""The precompute job: extract -> learn (per class) -> merge, shardable and resumable.

Work directory (``--work``, default ``BUNDLE.work``)::

    config.json                               the run's configuration and its hash
    features/part-00000-of-00002.safetensors  extraction of data shard i (samples with index % n == i)
    classes/<class id>.safetensors            everything learned for one class (basis, weights,
                                              prototypes, metrics); class y belongs to shard y % n

Every file is written atomically, so a killed run leaves only finished files, and a rerun with the
same configuration skips them. ``learn`` needs all extraction parts; ``merge`` needs all classes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..service.bundle import atomic_write_bytes, atomic_write_json, class_index, sha256_file
from ..service.explain import softmax
from .datasets import Dataset, open_dataset
from .class_pipeline import ClassPipeline
from .evaluate import logits_of
from .features import Progress, Record, extract, load_part, safetensors_info, save_part
from .models import PreprocessingOverrides, SplitModel, load_model
from .prototypes import CropPool

log = logging.getLogger(__name__)

# Fields that change what is learned; the rest (paths, shard, device, batch size) do not.
_HASHED = ("model", "weights", "layer", "labels", "preprocessing", "data", "group_by", "method", "concepts",
           "min_images", "max_images", "held_out", "prototypes", "prototype_cells", "prototypes_exclude_class",
           "classes", "seed", "nmf_max_iter", "nmf_tol", "method_params", "stability_folds", "contrast_samples",
           "examples", "importance", "attribution")
AUTO_METHOD = "auto"  # nmf on a non-negative layer, seminmf on a signed one
NEEDS_NON_NEGATIVE = ("nmf", "face", "attribution", "directions")  # their directions are >= 0


class JobError(ValueError):
    """A precompute run that cannot go on: the message says why and what to do."""


@dataclass
class PrecomputeConfig:
    model: str
    data: str
    out: str
    weights: str | None = None
    layer: str | None = None
    labels: str | None = None  # file: one class name per output
    preprocessing: dict = field(default_factory=dict)  # overrides: resize, crop, mean, std, interpolation
    work: str | None = None
    group_by: str = "predicted"  # "label" | "predicted"
    method: str = AUTO_METHOD
    method_params: dict = field(default_factory=dict)
    concepts: int | str = "auto"  # k, or "auto": chosen per class (precompute/selection.py)
    importance: str = "contribution"  # concept order for deletion/insertion: contribution | sobol
    attribution: str = "gradxact"  # attribution for --method attribution and contrast pixels: gradxact | deeplift
    min_images: int = 20
    max_images: int = 200
    held_out: float = 0.2
    prototypes: int = 5
    prototype_cells: int = 2
    prototypes_exclude_class: bool = False
    classes: list[str] | None = None
    seed: int = 0
    nmf_max_iter: int = 200
    nmf_tol: float = 1e-4
    stability_folds: int = 3
    contrast_samples: int = 512
    examples: int = 2
    batch_size: int = 32
    device: str = "auto"
    shard: tuple[int, int] = (0, 1)

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work else Path(str(self.out).rstrip("/") + ".work")

    def config_hash(self) -> str:
        d = asdict(self)
        d["weights_sha"] = _file_sha(self.weights)  # a missing file is the model loader's clear error
        d["labels_sha"] = _file_sha(self.labels)
        _, _, path = self.model.partition(":")
        d["model_sha"] = _file_sha(path) if self.model.split(":")[0] in ("onnx", "torchscript") else None
        keys = (*_HASHED, "weights_sha", "labels_sha", "model_sha")
        return hashlib.sha256(json.dumps({k: d[k] for k in keys}, sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]


def _file_sha(path: str | None) -> str | None:
    return sha256_file(path) if path and Path(path).is_file() else None


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(p) for p in str(text).split("/"))
    except ValueError:
        raise JobError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise JobError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _device(name: str) -> torch.device:
    from .learners.nmf import resolve_device

    return resolve_device(name)


class Job:
    """One precompute run; the stages can run in separate processes (sharded) or all in one."""

    def __init__(self, cfg: PrecomputeConfig):
        self.cfg = cfg
        self.work = cfg.work_dir
        self.hash = cfg.config_hash()
        self._model: SplitModel | None = None
        self._dataset: Dataset | None = None
        self._fwd = None  # the ONNX Runtime forward, created on first use

    # ---- shared pieces -------------------------------------------------------------------------
    @property
    def model(self) -> SplitModel:
        if self._model is None:
            m = load_model(self.cfg.model, self.cfg.weights, self.cfg.layer, self.cfg.labels,
                           PreprocessingOverrides(**self.cfg.preprocessing))
            names = self.dataset.label_names if self.cfg.group_by == "label" else None
            if m.placeholder_names and names and len(names) == len(m.class_names):
                log.info("the model's %d outputs are named after the data's %d labels in sorted order "
                         "(torchvision's ImageFolder convention): %s; give --labels to name them otherwise",
                         len(names), len(names), ", ".join(f"{i}={n}" for i, n in enumerate(names[:6]))
                         + (", ..." if len(names) > 6 else ""))
                m.class_names = list(names)
            self._model = m.to(_device(self.cfg.device))
        return self._model

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = open_dataset(self.cfg.data)
        return self._dataset

    @property
    def onnx_path(self) -> Path:
        return self.work / "model.onnx"

    def export(self) -> Path:
        """Export the model to ONNX once per work directory (atomic: concurrent shards are safe)."""
        if not self.onnx_path.is_file():
            import os
            import tempfile

            fd, tmp = tempfile.mkstemp(dir=self.work, suffix=".onnx.tmp")
            os.close(fd)
            try:
                self.model.export_onnx(tmp)
                os.replace(tmp, self.onnx_path)
            finally:
                Path(tmp).unlink(missing_ok=True)
            log.info("exported %s (%s, layer %s) to %s", self.model.name, self.cfg.model, self.model.layer,
                     self.onnx_path)
        return self.onnx_path

    def onnx_forward(self):
        """The exported model as a function (N,3,S,S) float32 -> (features, logits), on ONNX Runtime."""
        from ..service.runtime import OnnxRuntime, run_any_batch

        runtime = OnnxRuntime(self.export(), device=self.cfg.device)  # cuda:N picks GPU N
        return lambda batch: run_any_batch(runtime, batch)

    def part_path(self, i: int, n: int) -> Path:
        return self.work / "features" / f"part-{i:05d}-of-{n:05d}.safetensors"

    def class_path(self, cid: int) -> Path:
        return self.work / "classes" / f"{cid}.safetensors"

    def _check_work_dir(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        cfg_file = self.work / "config.json"
        if cfg_file.is_file():
            old = json.loads(cfg_file.read_text())
            if old.get("config_hash") != self.hash:
                raise JobError(f"{self.work} holds a run with another configuration; remove it or "
                               f"choose another --work/--out")
        else:
            d = asdict(self.cfg)
            d.pop("shard")
            atomic_write_json(cfg_file, {"config_hash": self.hash, "config": d})

    def _group_of(self):
        """label/predicted -> the model class an image is grouped under."""
        if self.cfg.group_by == "predicted":
            return lambda label, pred: pred
        if self.cfg.group_by != "label":
            raise JobError(f"--group-by must be 'label' or 'predicted', not {self.cfg.group_by!r}")
        names = self.dataset.label_names
        model_names = [n.lower() for n in self.model.class_names]
        mapping: dict[int, int] = {}
        for label, name in enumerate(names or []):
            key = name.lower()
            if key in model_names or key.replace("_", " ") in model_names:
                mapping[label] = model_names.index(key if key in model_names else key.replace("_", " "))
            elif name.isdigit() and int(name) < len(model_names):
                mapping[label] = int(name)
        if names and not mapping:
            if len(names) != len(model_names):
                raise JobError(f"the data's {len(names)} labels ({', '.join(names[:4])}, ...) are not classes of "
                               f"the model {self.cfg.model} ({len(model_names)} outputs): give the model's class "
                               f"names with --labels FILE, or use --group-by predicted")
            mapping = {i: i for i in range(len(names))}
            log.warning("the data's labels are not the model's class names: mapping its %d labels to the "
                        "model's outputs in sorted order (%s); give --labels FILE if that is not the "
                        "training order", len(names),
                        ", ".join(f"{n}->{self.model.class_names[i]}" for i, n in enumerate(names[:4])))
        elif names and len(mapping) < len(names):
            log.warning("%d of the data's %d labels are not classes of the model and are ignored: %s",
                        len(names) - len(mapping), len(names),
                        ", ".join(n for i, n in enumerate(names) if i not in mapping)[:200])
        if names is None and self.dataset.kind == "flat":
            raise JobError("a flat folder of images has no labels: use --group-by predicted")

        def group(label, pred):
            if label is None:
                return None
            return mapping.get(label, label if names is None else None)
        return group

    # ---- stage 1: extraction -------------------------------------------------------------------
    def extract(self) -> Path:
        i, n = self.cfg.shard
        _ = self.dataset, self.model  # check the data and the model before anything is written
        group = self._group_of()
        self._check_work_dir()
        path = self.part_path(i, n)
        if path.is_file():
            log.info("extract: %s is done already, skipping", path.name)
            return path
        log.info("extract: data %s (%s), shard %d/%d, model %s layer %s", self.cfg.data, self.dataset.kind,
                 i, n, self.model.name, self.model.layer)
        res = extract(self.dataset, self._forward(), self.model.preprocessing, group_of=group, shard=(i, n),
                      batch_size=self.cfg.batch_size, max_per_class=self.cfg.max_images, seed=self.cfg.seed)
        if res.processed == 0:
            raise JobError(f"no usable image in {self.cfg.data} (shard {i}/{n}); {res.skipped} could not be read")
        save_part(path, res, self.hash)
        log.info("extract: %d images, %d skipped, %d classes -> %s", res.processed, res.skipped,
                 len(res.reservoirs), path)
        return path

    # ---- stage 2: per-class learning -----------------------------------------------------------
    def load_records(self) -> tuple[dict[int, list[Record]], dict]:
        """All extraction parts merged: class -> records (bounded by max_images), and totals."""
        n = self.cfg.shard[1]
        parts = sorted((self.work / "features").glob(f"part-*-of-{n:05d}.safetensors"))
        if len(parts) != n:
            missing = [i for i in range(n) if not self.part_path(i, n).is_file()]
            raise JobError(f"extraction parts missing for data shards {missing} of {n}: run "
                           f"`conceptlens precompute --stage extract --shard I/{n}` for them first")
        merged: dict[int, list[Record]] = {}
        seen: dict[int, int] = {}
        totals = {"processed": 0, "skipped": 0, "skipped_keys": []}
        for p in parts:
            info, recs = load_part(p)
            if info["config_hash"] != self.hash:
                raise JobError(f"{p} was written by a run with another configuration")
            totals["processed"] += info["processed"]
            totals["skipped"] += info["skipped"]
            totals["skipped_keys"] += info["skipped_keys"]
            for cls, rs in recs.items():
                merged.setdefault(cls, []).extend(rs)
                seen[cls] = seen.get(cls, 0) + info["classes"][str(cls)]["seen"]
        rng = random.Random(self.cfg.seed)
        for cls, rs in merged.items():
            rs.sort(key=lambda r: r.key)
            if len(rs) > self.cfg.max_images:
                merged[cls] = sorted(rng.sample(rs, self.cfg.max_images), key=lambda r: r.key)
        totals["seen"] = seen
        return merged, totals

    def eligible_classes(self, records: dict[int, list[Record]]) -> list[int]:
        names = self.model.class_names
        wanted = None
        if self.cfg.classes:
            wanted = set()
            for c in self.cfg.classes:
                try:
                    wanted.add(class_index(names, c))
                except KeyError as e:
                    raise JobError(f"--classes: {e.args[0]} for model {self.cfg.model}") from None
        out, small = [], []
        for cls in sorted(records):
            if wanted is not None and cls not in wanted:
                continue
            (out if len(records[cls]) >= self.cfg.min_images else small).append(cls)
        if small:
            small.sort(key=lambda c: -len(records[c]))
            listed = ", ".join(f"{c} ({names[c]}): {len(records[c])}" for c in small[:8])
            log.warning("%d classes have < --min-images %d images: skipped; the largest: %s%s",
                        len(small), self.cfg.min_images, listed,
                        ", ..." if len(small) > 8 else "")
        if wanted is not None:
            for cls in sorted(wanted - set(records)):
                log.warning("class %d (%s) has no images in the data: skipped", cls, names[cls])
        if not out:
            raise JobError(f"no class has at least --min-images {self.cfg.min_images} images "
                           f"(largest: {max((len(v) for v in records.values()), default=0)}); "
                           f"add data or lower --min-images")
        return out

    def learn(self) -> list[int]:
        """Learn every eligible class of this shard that is not done yet; returns the class ids learned."""
        i, n = self.cfg.shard
        self._check_work_dir()
        records, totals = self.load_records()
        self.method = self.resolve_method(records)
        classes = [c for c in self.eligible_classes(records) if c % n == i]
        todo = [c for c in classes if not self._class_done(c)]
        if len(todo) < len(classes):
            log.info("learn: %d of %d classes of shard %d/%d are done already, skipping them",
                     len(classes) - len(todo), len(classes), i, n)
        if not todo:
            return []
        pool = CropPool.build([r for rs in records.values() for r in rs], cells=self.cfg.prototype_cells,
                              view_size=self.model.preprocessing.crop)
        progress = Progress("learn classes", total=len(todo), every=0)
        pipeline = ClassPipeline(self, records, pool)
        for cls in todo:
            t0 = time.perf_counter()
            self._learn_class(pipeline, cls, totals["seen"].get(cls, len(records[cls])))
            progress.update(1, extra=f"class {cls} ({self.model.class_names[cls]}) in "
                                     f"{time.perf_counter() - t0:.1f} s")
        return todo

    def resolve_method(self, records: dict[int, list[Record]]) -> str:
        """The learner for this layer: ``auto`` picks seminmf where activations are signed, nmf else;
        a learner that needs non-negative activations is refused on a signed layer."""
        low = min((float(r.features.min()) for rs in records.values() for r in rs), default=0.0)
        self.signed = low < 0
        method = self.cfg.method
        if method == AUTO_METHOD:
            method = "seminmf" if self.signed else "nmf"
            if self.signed:
                log.info("layer %s has signed activations (min %.3g): concepts by semi-NMF (signed directions, "
                         "non-negative codes); --method nmf needs a layer after a ReLU", self.model.layer, low)
        elif self.signed and method in NEEDS_NON_NEGATIVE:
            raise JobError(f"--method {method} needs non-negative activations, but layer {self.model.layer} is "
                           f"signed (min {low:.3g}): use --method seminmf (or the default, auto), or choose a "
                           f"layer after a ReLU with --layer")
        return method

    def _class_done(self, cls: int) -> bool:
        path = self.class_path(cls)
        if not path.is_file():
            return False
        try:
            return safetensors_info(path)["config_hash"] == self.hash
        except Exception:
            return False

    def _head(self):
        """(W, b, None) of a linear head, else (None, None, h as a numpy function)."""
        head = self.model.head
        return (head.weight, head.bias, None) if head.linear else (None, None, head.logits)

    def deeplift_reference(self) -> np.ndarray | None:
        """Features (C, H, W) of DeepLift's reference image (with --attribution deeplift), computed once."""
        if self.cfg.attribution != "deeplift":
            return None
        if getattr(self, "_deeplift_ref", None) is None:
            from .learners.attribution import reference_features

            self._deeplift_ref = reference_features(self._forward(), self.model.preprocessing.crop)
        return self._deeplift_ref

    def _attribution_head(self):
        """What attribution maps differentiate: W of a linear head, or the torch head module;
        None for a non-linear head that is only an ONNX graph (no gradients: no contrast data)."""
        return self.model.head_weight if self.model.linear_head else self.model.torch_head

    def _forward(self):
        if self._fwd is None:
            self._fwd = self.onnx_forward()
        return self._fwd

    @property
    def device(self) -> torch.device:
        return _device(self.cfg.device)

    def _learn_class(self, pipeline, cls: int, seen: int) -> None:
        """Learn one class (precompute/class_pipeline.py) and write its file atomically."""
        from safetensors.numpy import save

        result = pipeline.run(cls, seen)
        info = {"config_hash": self.hash, **result.info}
        atomic_write_bytes(self.class_path(cls), save(result.tensors, metadata={"info": json.dumps(info)}))
        held, flags = info["metrics"].get("held_out", {}), info["flags"]
        log.info("class %d (%s): %d images, k %d, held-out ICE fidelity %.3f, top-1 agreement %.2f%s", cls,
                 info["name"], info["images"], info["k"], held.get("ice_fidelity", float("nan")),
                 held.get("top1_agreement", float("nan")), f", flags {flags}" if flags else "")

    def _contrast_pair(self, a: int, b: int, px_a: np.ndarray, recs_b: list[Record], head_for_attr, hw, hb, hfn,
                       tensors: dict, k: int) -> dict:
        """Hyperplane and contrast concepts of "a rather than b" into ``tensors``; the shifting test."""
        from ..service.contrast import METHOD_PRECOMPUTED, compute_pair
        from .checks import attribution_pixels
        from .learners.contrast import shift_test

        feats_b = np.stack([r.features for r in recs_b]).astype(np.float32)
        px_b = attribution_pixels(feats_b, head_for_attr, b, self.cfg.contrast_samples, self.cfg.seed,
                                  method=self.cfg.attribution, reference=self.deeplift_reference())
        if len(px_b) == 0:
            return {}
        pair = compute_pair(a, b, px_a, px_b, k, seed=self.cfg.seed, method=METHOD_PRECOMPUTED)
        if pair is None:  # too few of a's pixels on its side of the hyperplane: no precomputed pair
            return {}
        normal, offset = pair.normal, pair.offset
        key = f"contrast/{a}_{b}"
        tensors[f"{key}/basis"] = pair.basis
        tensors[f"{key}/normal"] = normal
        tensors[f"{key}/offset"] = np.asarray([offset], np.float32)
        head = (torch.from_numpy(hw), torch.from_numpy(hb)) if hw is not None else self.model.torch_head
        base = float(np.mean(softmax(logits_of(feats_b, hw, hb, hfn))[:, a]))
        best = shift_test(torch.from_numpy(feats_b), torch.from_numpy(np.asarray(normal, np.float32)), offset,
                          head, a)
        return {"pairs": [{"target": a, "target_name": self.model.class_names[a], "source": b,
                           "source_name": self.model.class_names[b], "baseline_probability": base,
                           "max_probability": float(best)}]}

    # ---- stage 3: merge ------------------------------------------------------------------------
    def merge(self) -> Path:
        return merge_bundle([self.work], Path(self.cfg.out), self)


def class_flags(metrics: dict, images: int, min_images: int) -> list[str]:
    """Evaluation flags the service passes on: reasons not to trust a class's explanation."""
    flags = []
    if metrics.get("stitched") and metrics["stitched"].get("pass") is False:
        flags.append("failed_stitched_prototype_test")
    for pair in (metrics.get("shift") or {}).get("pairs", []):
        if pair["max_probability"] < 0.5:
            flags.append("failed_hyperplane_shift_test")
    ho = metrics.get("held_out") or metrics.get("train") or {}
    if ho.get("ice_fidelity", 0.0) > 0.3:
        flags.append("low_fidelity")
    if ho.get("top1_agreement", 1.0) < 0.8:
        flags.append("low_top1_agreement")
    if not metrics.get("held_out"):
        flags.append("no_held_out_images")
    return flags


def merge_bundle(work_dirs: list[Path], out: Path, job: Job | None = None) -> Path:
    """Assemble one bundle from the class results in ``work_dirs`` (one per shard, or a shared one)."""
    import tempfile

    from safetensors.numpy import load

    from ..service.manifest import ClassEntry, MethodCard
    from .bundle_writer import write_bundle

    configs = []
    for w in work_dirs:
        f = Path(w) / "config.json"
        if not f.is_file():
            raise JobError(f"{w} is not a precompute work directory (no config.json)")
        configs.append(json.loads(f.read_text()))
    if len({c["config_hash"] for c in configs}) != 1:
        raise JobError("the work directories come from runs with different configurations")
    cfgd = configs[0]["config"]
    cfg = job.cfg if job else PrecomputeConfig(**{k: v for k, v in cfgd.items() if k in PrecomputeConfig.__dataclass_fields__})
    job = job or Job(cfg)
    files = {p.name: p for w in work_dirs for p in sorted((Path(w) / "classes").glob("*.safetensors"))}
    if not files:
        raise JobError(f"no learned classes in {', '.join(map(str, work_dirs))}: run the learn stage first")
    model = job.model
    classes, tensors, prototypes, jpegs = {}, {}, {}, {}
    signed = False
    for name, path in sorted(files.items(), key=lambda kv: int(kv[0].split(".")[0])):
        data = path.read_bytes()  # once: tensors and metadata
        info = safetensors_info(data)
        if info["config_hash"] != configs[0]["config_hash"]:
            raise JobError(f"{path} comes from another configuration")
        t = load(data)
        cls = int(info["class_id"])
        tensors[f"basis/{cls}"], tensors[f"weights/{cls}"] = t["basis"], t["weights"]
        for key, val in t.items():
            if key.startswith("contrast/"):
                tensors[key] = val
        if "samples" in t:
            tensors[f"samples/{cls}"] = t["samples"]
        if "anchor" in t:
            tensors[f"anchor/{cls}"] = t["anchor"]
        for key, val in t.items():  # a learner's extra served tensors (e.g. decoding directions)
            if key.startswith("served/"):
                tensors[f"{key.removeprefix('served/')}/{cls}"] = val
        if "examples_codes" in t:
            tensors[f"examples/{cls}/codes"] = t["examples_codes"]
            for i in range(len(t["examples_codes"])):
                jpegs[f"examples/{cls}/{i}.jpg"] = t[f"example/{i}"].tobytes()
        protos = []
        for j, concept in enumerate(info["prototypes"]):
            refs = []
            for r, p in enumerate(concept):
                rel = f"prototypes/{cls}/{j}_{r}.jpg"
                jpegs[rel] = t[f"proto/{j}/{r}"].tobytes()
                refs.append({"file": rel, "source": p["source"], "box": p["box"], "score": p["score"]})
            protos.append(refs)
        prototypes[cls] = protos
        classes[cls] = ClassEntry(**{k: info[k] for k in ("name", "k", "images", "images_seen", "held_out_images",
                                                          "metrics", "flags", "method")})
        signed = signed or bool(info.get("signed_features", False))
    methods = sorted({c.method for c in classes.values()})
    log.info("merge: %d classes; exporting the model to ONNX", len(classes))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = job.export()
        head_onnx = None if model.linear_head else model.export_head_onnx(Path(tmp) / "head.onnx")
        out = write_bundle(
            out, model_onnx=onnx_path, head_onnx=head_onnx, model=model.card(signed_features=signed),
            class_names=model.class_names, preprocessing=model.preprocessing, head_weight=model.head_weight,
            head_bias=model.head_bias, classes=classes, tensors=tensors, prototypes=prototypes, prototype_jpegs=jpegs,
            method=MethodCard(name="+".join(methods), params={"concepts": cfg.concepts, **cfg.method_params,
                                                              "requested": cfg.method},
                              group_by=cfg.group_by, max_images=cfg.max_images, held_out=cfg.held_out, seed=cfg.seed),
            data={"path": str(cfg.data)}, config_hash=configs[0]["config_hash"])
    log.info("merge: bundle written to %s", out)
    return out


def run(cfg: PrecomputeConfig, stage: str = "all") -> Path | None:
    """Run ``stage`` (extract | learn | merge | all) of the job; "all" with one shard does everything."""
    job = Job(cfg)
    i, n = cfg.shard
    if stage in ("extract", "all"):
        job.extract()
    if stage in ("learn", "all"):
        if stage == "all" and n > 1 and any(not job.part_path(j, n).is_file() for j in range(n)):
            log.info("learn: waiting for the other extraction shards; run --stage learn --shard %d/%d later", i, n)
            return None
        job.learn()
    if stage == "merge" or (stage == "all" and n == 1):
        return job.merge()
    return None
