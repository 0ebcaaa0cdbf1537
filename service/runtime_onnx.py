"""ONNX Runtime sessions: the CUDA provider where a GPU is really present, else the CPU."""
from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when onnxruntime has the CUDA provider and a GPU is visible (never asks CUDA otherwise,
    since onnxruntime-gpu logs an error for the CUDA provider on a machine without one)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if not any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl")):
        return False
    try:
        ort.preload_dlls()
    except Exception as e:  # missing CUDA libraries: fall back to CPU
        log.warning("CUDA libraries could not be loaded (%s); using the CPU", e)
        return False
    return True


def create_session(model_path, device: str = "auto", intra_threads: int = 0, inter_threads: int = 0):
    """An InferenceSession on CUDA (device 'auto' with a GPU, or 'cuda[:i]') or the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_threads:
        opts.intra_op_num_threads = intra_threads
    if inter_threads:
        opts.inter_op_num_threads = inter_threads
    providers: list = ["CPUExecutionProvider"]
    want_cuda = device.startswith("cuda") or (device == "auto" and cuda_available())
    if want_cuda:
        if not cuda_available():
            raise RuntimeError(f"device {device!r} asked for, but no usable GPU/CUDA provider is present")
        idx = int(device.split(":")[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
