"""The model-facing pieces one precompute job shares with its per-class steps.

The job (``job.py``) builds one :class:`ModelAccess` around its split model and work directory and
hands it to the class pipeline; nothing here imports the job or the pipeline, so imports flow one
way: job -> class_pipeline -> selection -> learners, each of them reading the model through this.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .learners.nmf import resolve_device
from .models import SplitModel

log = logging.getLogger(__name__)

Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (N,3,S,S) float32 -> features, logits


class ModelAccess:
    """The split model, its exported ONNX forward, its head as arrays or a function, and what
    attribution maps differentiate. ``work``: the job's work directory (the ONNX export lives there,
    written once and atomically, so concurrent shards share it)."""

    def __init__(self, model: SplitModel, work: Path, source: str, device: str = "auto",
                 attribution: str = "gradxact"):
        self.model, self.work, self.source = model, Path(work), source
        self.device_name, self.attribution = device, attribution
        self._forward: Forward | None = None
        self._deeplift_ref: np.ndarray | None = None

    @property
    def device(self) -> torch.device:
        return resolve_device(self.device_name)

    @property
    def onnx_path(self) -> Path:
        return self.work / "model.onnx"

    def export(self) -> Path:
        """Export the model to ONNX once per work directory (atomic: concurrent shards are safe)."""
        if not self.onnx_path.is_file():
            self.work.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.work, suffix=".onnx.tmp")
            os.close(fd)
            try:
                self.model.export_onnx(tmp)
                os.replace(tmp, self.onnx_path)
            finally:
                Path(tmp).unlink(missing_ok=True)
            log.info("exported %s (%s, layer %s) to %s", self.model.name, self.source, self.model.layer,
                     self.onnx_path)
        return self.onnx_path

    def forward(self) -> Forward:
        """The exported model on ONNX Runtime (the service's own runtime), created on first use."""
        if self._forward is None:
            from ..service.runtime import OnnxRuntime, run_any_batch

            runtime = OnnxRuntime(self.export(), device=self.device_name)  # cuda:N picks GPU N
            self._forward = lambda batch: run_any_batch(runtime, batch)
        return self._forward

    def head(self) -> tuple[np.ndarray | None, np.ndarray | None, Callable | None]:
        """(W (K, C), b (K,), None) of a linear head, else (None, None, h as a numpy function)."""
        head = self.model.head
        return (head.weight, head.bias, None) if head.linear else (None, None, head.logits)

    def attribution_head(self):
        """What attribution maps differentiate: W of a linear head, or the torch head module;
        None for a non-linear head that is only an ONNX graph (no gradients: no contrast data)."""
        return self.model.head_weight if self.model.linear_head else self.model.torch_head

    def deeplift_reference(self) -> np.ndarray | None:
        """Features (C, H, W) of DeepLift's reference image (with --attribution deeplift), computed once."""
        if self.attribution != "deeplift":
            return None
        if self._deeplift_ref is None:
            from .learners.attribution import reference_features

            self._deeplift_ref = reference_features(self.forward(), self.model.preprocessing.crop)
        return self._deeplift_ref
