"""The model runtime inside a TorchServe worker: the bundle's ONNX model on ONNX Runtime.

TorchServe gives each worker a ``gpu_id`` when the model is served on GPUs (``number_of_gpu`` > 0 and
``deviceType: gpu``); the worker then runs on that GPU's CUDA provider, else on the CPU. CUDA is
only asked for when a GPU is really present (ONNX Runtime logs an error otherwise), and
``device: cuda`` in the archive's config fails loudly where there is none.

Same model file, same ONNX Runtime, same session settings as ``conceptlens serve``: the handler's
features and logits are the service's to float rounding.
"""
from __future__ import annotations

import os

from ..service.runtime import OnnxRuntime, RuntimeSetupError, select_providers



class WorkerOnnxRuntime(OnnxRuntime):
    """The service's ``OnnxRuntime`` (same session settings, same ``run``) on the CUDA device id that
    TorchServe gave this worker, or on the CPU when it gave none."""

    def __init__(self, model_path: str | os.PathLike, device: str = "auto", gpu_id: int | None = None,
                 intra_op_threads: int = 0, inter_op_threads: int = 1):
        if device not in ("auto", "cpu", "cuda"):
            raise RuntimeSetupError(f"unknown device {device!r}: use auto, cpu or cuda")
        if device == "cuda" and gpu_id is None:
            raise RuntimeSetupError("device cuda was asked for, but TorchServe gave this worker no GPU")
        providers = select_providers("cpu" if gpu_id is None else device, device_id=gpu_id)
        super().__init__(model_path, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads,
                         providers=providers)
        if gpu_id is not None and providers[0] != "CPUExecutionProvider" \
                and "CUDAExecutionProvider" not in self.providers:
            raise RuntimeSetupError(f"the CUDA provider could not start on GPU {gpu_id}")
