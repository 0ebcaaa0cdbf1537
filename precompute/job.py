"""The precompute job: extract -> learn (per class) -> merge, shardable and resumable.

Work directory (``--work``, default ``BUNDLE.work``)::

    config.json                               the run's configuration and its hash
    features/part-00000-of-00002.safetensors  extraction of data shard i (samples with index % n == i)
    features/spill/part-00000-of-00002.0000.safetensors
                                              maps a shard wrote out past --extract-memory-mib
                                              (the part lists its spills; the store takes each
                                              class's bottom-k back out of all of them)
    classes/<class id>.safetensors            everything learned for one class (basis, weights,
                                              prototypes, metrics); class y belongs to shard y % n
    classes/staged/<class id>.safetensors     a class learned, waiting for its shard's one pass of
                                              prototype mining (then finished into the file above)

Every file is written atomically, so a killed run leaves only finished files, and a rerun with the
same configuration skips them. ``learn`` needs all extraction parts; ``merge`` needs all classes.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path


from ..service.bundle import atomic_write_bytes, atomic_write_json, class_index
from .class_pipeline import ClassPipeline, ClassResult, LearnSettings
from .config import AUTO_METHOD, NEEDS_NON_NEGATIVE, JobError, PrecomputeConfig, parse_shard  # noqa: F401 (re-exported)
from .datasets import Dataset, open_dataset
from .learner_params import LearnerParamsError, resolve_learner_params
from .learners.nmf import resolve_device
from .model_access import ModelAccess
from .feature_store import FeatureStore, PartFile
from .features import SAFETENSORS_DTYPES, Progress, extract, safetensors_info, save_part
from .models import PreprocessingOverrides, SplitModel, load_model
from .prototypes import BOXES, RANKINGS

log = logging.getLogger(__name__)

MINE_BATCH = 256  # classes whose crops one pass of the pool mines (their running tops: ~m x G x k each)

class Job:
    """One precompute run; the stages can run in separate processes (sharded) or all in one."""

    def __init__(self, cfg: PrecomputeConfig):
        for name, value, allowed in (("--prototype-ranking", cfg.prototype_ranking, RANKINGS),
                                     ("--prototype-box", cfg.prototype_box, BOXES)):
            if value not in allowed:
                raise JobError(f"{name} {value!r}: choose {' or '.join(allowed)}")
        self.cfg = cfg
        self.work = cfg.work_dir
        self.hash = cfg.config_hash()
        self._model: SplitModel | None = None
        self._dataset: Dataset | None = None
        self._access: ModelAccess | None = None

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
            self._model = m.to(resolve_device(self.cfg.device))
        return self._model

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = open_dataset(self.cfg.data)
        return self._dataset

    @property
    def access(self) -> ModelAccess:
        """The model-facing pieces (ONNX export and forward, head, attribution) shared with the class pipeline."""
        if self._access is None:
            self._access = ModelAccess(self.model, self.work, self.cfg.model, self.cfg.device, self.cfg.attribution)
        return self._access

    def export(self) -> Path:
        return self.access.export()

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
        spills: list[str] = []

        def spill(held) -> None:  # past the memory budget: the maps held so far go to disk
            name = f"spill/{path.stem}.{len(spills):04d}.safetensors"
            save_part(path.parent / name, held, self.hash, cells=self.cfg.prototype_cells)
            spills.append(name)
            log.info("extract: %d maps spilled to %s (memory budget %d MiB); peak RSS %.0f MiB",
                     sum(len(r.heap) for r in held.reservoirs.values()), name, self.cfg.extract_memory_mib,
                     peak_rss_mib())

        map_bytes = 2 * max(1, math.prod(self.model.feature_shape))  # float16
        res = extract(self.dataset, self.access.forward(), self.model.preprocessing, group_of=group, shard=(i, n),
                      batch_size=self.cfg.batch_size, max_per_class=self.cfg.max_images, seed=self.cfg.seed,
                      spill=spill, spill_records=max(1, (self.cfg.extract_memory_mib << 20) // map_bytes))
        if res.processed == 0:
            raise JobError(f"no usable image in {self.cfg.data} (shard {i}/{n}); {res.skipped} could not be read")
        save_part(path, res, self.hash, cells=self.cfg.prototype_cells, spills=spills)
        log.info("extract: %d images, %d skipped, %d classes -> %s; peak RSS %.0f MiB", res.processed, res.skipped,
                 len(res.reservoirs), path, peak_rss_mib())
        return path

    # ---- stage 2: per-class learning -----------------------------------------------------------
    def load_records(self) -> tuple[FeatureStore, dict]:
        """All extraction parts as one store: class -> records (bounded by max_images), read from disk
        per class on access (:mod:`.feature_store`), and totals."""
        n = self.cfg.shard[1]
        parts = sorted((self.work / "features").glob(f"part-*-of-{n:05d}.safetensors"))
        if len(parts) != n:
            missing = [i for i in range(n) if not self.part_path(i, n).is_file()]
            raise JobError(f"extraction parts missing for data shards {missing} of {n}: run "
                           f"`conceptlens precompute --stage extract --shard I/{n}` for them first")
        parts += [p.parent / name for p in list(parts) for name in safetensors_info(p).get("spills", [])]
        store = FeatureStore(parts, self.cfg.max_images, self.cfg.seed)  # headers only: a class is read when learned
        for p, info in zip(parts, store.infos):
            if info["config_hash"] != self.hash:
                raise JobError(f"{p} was written by a run with another configuration")
        return store, store.totals

    def eligible_classes(self, records: FeatureStore) -> list[int]:
        names = self.model.class_names
        size = records.count
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
            (out if size(cls) >= self.cfg.min_images else small).append(cls)
        if small:
            small.sort(key=lambda c: -size(c))
            listed = ", ".join(f"{c} ({names[c]}): {size(c)}" for c in small[:8])
            log.warning("%d classes have < --min-images %d images: skipped; the largest: %s%s",
                        len(small), self.cfg.min_images, listed,
                        ", ..." if len(small) > 8 else "")
        if wanted is not None:
            for cls in sorted(wanted - set(records)):
                log.warning("class %d (%s) has no images in the data: skipped", cls, names[cls])
        if not out:
            raise JobError(f"no class has at least --min-images {self.cfg.min_images} images "
                           f"(largest: {max((size(c) for c in records), default=0)}); "
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
        pool = records  # the crop pool: every kept image's windows, streamed block by block while mining
        pipeline = self.pipeline(records, pool)
        staged = [c for c in todo if self._written_by_this_run(self.staged_path(c))]
        if staged:
            log.info("learn: %d classes were learned already and wait for their prototypes", len(staged))
        progress = Progress("learn classes", total=len(todo), every=0)
        progress.update(len(staged), extra="staged already" if staged else "")
        for cls in todo:
            if cls in staged:
                continue
            t0 = time.perf_counter()
            self._write_class(self.staged_path(cls), pipeline.learn(cls, totals["seen"].get(cls, records.count(cls))))
            progress.update(1, extra=f"class {cls} ({self.model.class_names[cls]}) in "
                                     f"{time.perf_counter() - t0:.1f} s")
        for lo in range(0, len(todo), MINE_BATCH):
            self._finish_classes(pipeline, todo[lo:lo + MINE_BATCH], pool)
        return todo

    def _finish_classes(self, pipeline: ClassPipeline, classes: list[int], pool) -> None:
        """Mine the crops of ``classes`` (staged) in one pass of the pool, then finish and write each."""
        from safetensors.numpy import load

        from .prototypes import head_on_windows, mine_classes

        t0 = time.perf_counter()
        bases = {c: PartFile(self.staged_path(c)).read("basis") for c in classes}
        weight, bias, head_fn = self.access.head()
        mined = mine_classes(pool, bases, max(1, self.cfg.prototypes),
                             window_logits=head_on_windows(weight, bias, head_fn, tuple(self.model.feature_shape[1:])),
                             logit_rows={c: pipeline.logit_row(c) for c in classes if pipeline.logit_weight > 0},
                             logit_weight=pipeline.logit_weight)
        log.info("prototypes: %d classes' concepts mined over %d pool images in one pass, %.1f s; peak RSS %.0f MiB",
                 len(classes), len(pool.images), time.perf_counter() - t0, peak_rss_mib())
        progress = Progress("finish classes", total=len(classes), every=0)
        for cls in classes:
            path = self.staged_path(cls)
            raw = path.read_bytes()
            info = safetensors_info(raw)
            info.pop("config_hash", None)
            result = pipeline.finish(ClassResult(load(raw), info), mined[cls])
            self._write_class(self.class_path(cls), result)
            path.unlink()
            self._log_class(result.info)
            progress.update(1, extra=f"class {cls}")

    def pipeline(self, records, pool=None) -> ClassPipeline:
        """The per-class steps for this job's learner (``self.method``, from :meth:`resolve_method`), its
        parameters typed once here: ``auto`` ones are chosen per class, never passed to a learner."""
        try:
            params = resolve_learner_params(self.method, self.cfg.method_params)
        except LearnerParamsError as e:
            raise JobError(str(e)) from None
        return ClassPipeline(self.access, LearnSettings(self.cfg, self.method, self.signed, params), records, pool,
                             prototype_ranking=self.cfg.prototype_ranking)

    def resolve_method(self, records: FeatureStore) -> str:
        """The learner for this layer: ``auto`` picks seminmf where activations are signed, nmf else;
        a learner that needs non-negative activations is refused on a signed layer."""
        low = records.min_activation()
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
        return self._written_by_this_run(self.class_path(cls))

    def _written_by_this_run(self, path: Path) -> bool:
        """``path`` exists and carries this run's configuration hash (a finished step to skip)."""
        try:
            return path.is_file() and safetensors_info(path)["config_hash"] == self.hash
        except Exception:
            return False

    def staged_path(self, cid: int) -> Path:
        """A class learned but not yet finished (waiting for its shard's prototype pass)."""
        return self.work / "classes" / "staged" / f"{cid}.safetensors"

    def _write_class(self, path: Path, result: ClassResult) -> None:
        """A class's tensors and manifest entry, atomically, stamped with the run's configuration hash."""
        from safetensors.numpy import save

        info = {"config_hash": self.hash, **result.info}
        atomic_write_bytes(path, save(result.tensors, metadata={"info": json.dumps(info)}))

    @staticmethod
    def _log_class(info: dict) -> None:
        held, flags = info["metrics"].get("held_out", {}), info["flags"]
        steps = ", ".join(f"{k} {v:.2f}" for k, v in info.get("seconds", {}).items())
        log.info("class %d (%s): %d images, k %d, held-out ICE fidelity %.3f, top-1 agreement %.2f%s; seconds: %s; "
                 "peak RSS %.0f MiB", info["class_id"], info["name"], info["images"], info["k"],
                 held.get("ice_fidelity", float("nan")), held.get("top1_agreement", float("nan")),
                 f", flags {flags}" if flags else "", steps, peak_rss_mib())

    # ---- stage 3: merge ------------------------------------------------------------------------
    def merge(self) -> Path:
        return merge_bundle([self.work], Path(self.cfg.out), self)


def peak_rss_mib() -> float:
    """This process's peak resident set so far, MiB (each stage logs it: memory is bounded by a class).

    Linux's VmHWM, the high-water mark of this program's own memory: ``ru_maxrss`` also keeps the
    parent's peak when a large process forks and execs this one (a bench, a notebook), so it would
    report the parent's memory as ours."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def merge_bundle(work_dirs: list[Path], out: Path, job: Job | None = None) -> Path:
    """Assemble one bundle from the class results in ``work_dirs`` (one per shard, or a shared one)."""
    import tempfile

    from ..service.manifest import ClassEntry, MethodCard
    from .bundle_writer import StreamedTensors, write_bundle

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
    # two passes, one class in memory at a time: the headers make the manifest and the tensor specs,
    # then each class's tensors and JPEGs are streamed into the bundle
    classes, prototypes, specs, sources = {}, {}, {}, []
    signed = False
    for name, path in sorted(files.items(), key=lambda kv: int(kv[0].split(".")[0])):
        part = PartFile(path)  # its header once: the manifest entry, the specs, then the reads
        info, header = part.info, part.tensors
        if info.get("config_hash") != configs[0]["config_hash"]:
            raise JobError(f"{path} comes from another configuration")
        cls = int(info["class_id"])
        served = _served_names(cls, list(header))
        for bundle_name, own in served:
            specs[bundle_name] = (SAFETENSORS_DTYPES[header[own]["dtype"]], tuple(header[own]["shape"]))
        protos = [[{"file": f"prototypes/{cls}/{j}_{r}.jpg", "source": p["source"], "box": p["box"],
                    "score": p["score"]} for r, p in enumerate(concept)] for j, concept in enumerate(info["prototypes"])]
        prototypes[cls] = protos
        examples = header.get("examples_codes", {}).get("shape", [0])[0]
        sources.append((part, served, protos, [(f"examples/{cls}/{i}.jpg", f"example/{i}") for i in range(examples)]))
        classes[cls] = ClassEntry(**{k: info[k] for k in ("name", "k", "images", "images_seen", "held_out_images",
                                                          "metrics", "flags", "method")})
        signed = signed or bool(info.get("signed_features", False))

    def items():
        for part, served, protos, examples in sources:
            for bundle_name, own in served:
                yield "tensor", bundle_name, part.read(own)
            for j, refs in enumerate(protos):
                for r, ref in enumerate(refs):
                    yield "file", ref["file"], part.read(f"proto/{j}/{r}").tobytes()
            for rel, own in examples:
                yield "file", rel, part.read(own).tobytes()

    tensors = StreamedTensors(specs, items)
    methods = sorted({c.method for c in classes.values()})
    log.info("merge: %d classes; exporting the model to ONNX", len(classes))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = job.export()
        head_onnx = None if model.linear_head else model.export_head_onnx(Path(tmp) / "head.onnx")
        out = write_bundle(
            out, model_onnx=onnx_path, head_onnx=head_onnx, model=model.card(signed_features=signed),
            class_names=model.class_names, preprocessing=model.preprocessing, head_weight=model.head_weight,
            head_bias=model.head_bias, classes=classes, tensors=tensors, prototypes=prototypes, prototype_jpegs={},
            method=MethodCard(name="+".join(methods), params={"concepts": cfg.concepts, **cfg.method_params,
                                                              "requested": cfg.method},
                              group_by=cfg.group_by, max_images=cfg.max_images, held_out=cfg.held_out, seed=cfg.seed,
                              logit_weight=float(cfg.logit_weight) if model.linear_head else 0.0),
            data={"path": str(cfg.data)}, config_hash=configs[0]["config_hash"])
    log.info("merge: bundle written to %s; peak RSS %.0f MiB", out, peak_rss_mib())
    return out


def _served_names(cls: int, names: list[str]) -> list[tuple[str, str]]:
    """(name in the bundle's concepts.safetensors, name in the class file) of a class's served
    tensors, in the bundle's order: basis, weights, contrast pairs, contrast samples, the anchor of a
    non-linear head, a learner's extra tensors (``served/``), the example codes."""
    own = set(names)
    out = [(f"basis/{cls}", "basis"), (f"weights/{cls}", "weights")]
    out += [(n, n) for n in sorted(own) if n.startswith("contrast/")]
    out += [(f"{bundle}/{cls}", n) for bundle, n in (("samples", "samples"), ("anchor", "anchor")) if n in own]
    out += [(f"{n.removeprefix('served/')}/{cls}", n) for n in sorted(own) if n.startswith("served/")]
    if "examples_codes" in own:
        out.append((f"examples/{cls}/codes", "examples_codes"))
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
