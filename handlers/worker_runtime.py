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

from ..service.runtime import OnnxRuntime, RuntimeSetupError, cuda_device_present

log = logging.getLogger(__name__)


class WorkerOnnxRuntime(OnnxRuntime):
    """The service's ``OnnxRuntime`` (same session settings, same ``run``) on the CUDA device id that
    TorchServe gave this worker, or on the CPU."""

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
        super().__init__(model_path, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads,
                         providers=providers)
        if use_cuda and "CUDAExecutionProvider" not in self.providers:
            raise RuntimeSetupError(f"the CUDA provider could not start on GPU {gpu_id}")
