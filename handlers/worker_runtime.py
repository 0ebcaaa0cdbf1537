"""The model runtime inside a TorchServe worker: the bundle's ONNX model on ONNX Runtime.

TorchServe gives each worker a ``gpu_id`` when the model is served on GPUs (``number_of_gpu`` > 0 and
``deviceType: gpu``); the worker then runs on that GPU's CUDA provider, else on the CPU. CUDA is
only asked for when a GPU is really present (ONNX Runtime logs an error otherwise), and
``device: cuda`` in the archive's config fails loudly where there is none.

Same model file, same ONNX Runtime, same session settings as ``conceptlens serve``: the handler's
features and logits are the service's to float rounding.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from ..service.runtime import RuntimeSetupError, cuda_device_present

log = logging.getLogger(__name__)


class WorkerOnnxRuntime:
    """image batch (N, 3, S, S) float32 -> (features (N, C, H, W), logits (N, K)), as the service's
    ``OnnxRuntime`` but on a given CUDA device id."""

    name = "onnxruntime"

    def __init__(self, model_path: str | os.PathLike, device: str = "auto", gpu_id: int | None = None,
                 intra_op_threads: int = 0, inter_op_threads: int = 1):
        import onnxruntime as ort

        if device not in ("auto", "cpu", "cuda"):
            raise RuntimeSetupError(f"unknown device {device!r}: use auto, cpu or cuda")
        has_ep = "CUDAExecutionProvider" in ort.get_available_providers()
        use_cuda = device != "cpu" and gpu_id is not None and has_ep and cuda_device_present()
        if device == "cuda" and not use_cuda:
            raise RuntimeSetupError("device cuda was asked for, but TorchServe gave this worker no GPU, "
                                    "or no GPU/CUDA provider is present")
        providers: list = ["CPUExecutionProvider"]
        if use_cuda:
            preload = getattr(ort, "preload_dlls", None)
            if preload is not None:
                try:
                    preload()
                except Exception as e:  # system CUDA may still be found
                    log.debug("onnxruntime.preload_dlls() failed: %s", e)
            providers = [("CUDAExecutionProvider", {"device_id": int(gpu_id)}), "CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = max(0, int(intra_op_threads))
        so.inter_op_num_threads = max(0, int(inter_op_threads))
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        except Exception as e:
            raise RuntimeSetupError(f"cannot load ONNX model {model_path}: {e}") from e
        self.providers = list(self.session.get_providers())
        if use_cuda and "CUDAExecutionProvider" not in self.providers:
            raise RuntimeSetupError(f"the CUDA provider could not start on GPU {gpu_id}")
        self.input_name = self.session.get_inputs()[0].name
        dim0 = self.session.get_inputs()[0].shape[0]
        self.max_batch_size = dim0 if isinstance(dim0, int) and dim0 > 0 else None

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """batch (N, 3, S, S) float32 -> (features (N, C, H, W) float32, logits (N, K) float32)."""
        if batch.dtype != np.float32 or not batch.flags.c_contiguous:
            batch = np.ascontiguousarray(batch, dtype=np.float32)
        features, logits = self.session.run(["features", "logits"], {self.input_name: batch})
        return features, logits

    def close(self) -> None:
        self.session = None
