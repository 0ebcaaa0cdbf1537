"""Model runtimes: run the bundle's CNN on a batch and return its two outputs.

A runtime implements :class:`Runtime`. ``OnnxRuntime`` runs ``model.onnx`` with ONNX Runtime on the
CUDA provider when a GPU is really present and on the CPU otherwise (asking for CUDA on a machine
without a GPU makes ONNX Runtime log an error, so it is never asked there). Other runtimes (for
example TorchServe) plug in through :func:`register_runtime`.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
from typing import Callable, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)


@runtime_checkable
class Runtime(Protocol):
    """What the server needs from a model runtime."""

    name: str  # e.g. "onnxruntime"
    providers: list[str]  # execution providers or devices in use
    max_batch_size: int | None  # a fixed batch size the model demands, else None

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """batch (N, 3, S, S) float32 -> (features (N, C, H, W) float32, logits (N, K) float32)."""

    def close(self) -> None:
        """Release the model."""


def single_threaded_blas() -> None:
    """Run numpy's BLAS on one thread in this process (the serving processes call this).

    The explain core's matrix products are small (H*W x C by C x k); a multi-threaded BLAS gains
    nothing on them, and its threads spin after each call, taking the cores the model's own
    threads need: with OpenBLAS's default, serving throughput on ResNet-50 fell by a quarter.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the limit is an optimisation; serving works without it
        log.warning("threadpoolctl is missing: numpy's BLAS keeps its default threads")
        return
    threadpool_limits(limits=1, user_api="blas")


class RuntimeSetupError(RuntimeError):
    """A runtime that cannot be created as asked (no GPU for --device cuda, unreadable model)."""


def cuda_device_present() -> bool:
    """True when an NVIDIA GPU is visible to this process, decided without starting CUDA in ORT.

    Checks CUDA_VISIBLE_DEVICES, the driver's device nodes, and (when libcuda loads) the driver's
    own device count.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    if not (glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*")):
        return False
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    try:
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return False
    except AttributeError:
        return False
    return count.value > 0


def select_providers(device: str = "auto", device_id: int | None = None) -> list:
    """ONNX Runtime execution providers for ``device`` in auto|cpu|cuda|cuda:N.

    ``auto`` takes CUDA only when ORT was built with it *and* a GPU is present; ``cuda`` raises
    RuntimeSetupError when that is not so. ``cuda:N`` (or ``device_id``) picks GPU N.
    """
    import onnxruntime as ort

    if device.startswith("cuda:") and device[5:].isdigit():
        device, device_id = "cuda", int(device[5:])
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    has_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    has_gpu = has_ep and cuda_device_present()
    if has_gpu:
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            try:
                preload()
            except Exception as e:  # missing nvidia-* wheels: ORT may still find system CUDA
                log.debug("onnxruntime.preload_dlls() failed: %s", e)
        cuda = "CUDAExecutionProvider" if device_id is None else ("CUDAExecutionProvider", {"device_id": int(device_id)})
        return [cuda, "CPUExecutionProvider"]
    if device == "cuda":
        why = "this onnxruntime has no CUDA provider" if not has_ep else "no GPU is present"
        raise RuntimeSetupError(f"--device cuda was asked for, but {why}")
    return ["CPUExecutionProvider"]


def open_session(model_path: str | os.PathLike, providers: list, intra_op_threads: int = 0,
                 inter_op_threads: int = 1, spin: bool = False):
    """An ONNX Runtime InferenceSession with the settings every conceptlens runtime uses: all graph
    optimizations, sequential execution, ``intra_op_threads`` (0: ORT picks, one per physical
    core), no spinning between runs unless ``spin``. RuntimeSetupError when the model cannot load."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = max(0, int(intra_op_threads))
    so.inter_op_num_threads = max(0, int(inter_op_threads))
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
    except Exception as e:
        raise RuntimeSetupError(f"cannot load ONNX model {model_path}: {e}") from e


class OnnxRuntime:
    """ONNX Runtime session of a two-output model (input "image", outputs "features", "logits").

    ``intra_op_threads`` 0 lets ORT pick (one per physical core). ``spin`` keeps ORT's worker
    threads spinning between runs: lower latency on a dedicated machine, burnt CPU on a shared one.
    ``run`` is thread-safe (ORT sessions are) but the server calls it from one thread at a time.
    """

    name = "onnxruntime"

    def __init__(self, model_path: str | os.PathLike, device: str = "auto", intra_op_threads: int = 0,
                 inter_op_threads: int = 1, spin: bool = False, providers: list | None = None):
        """``providers``: explicit ONNX Runtime providers (else chosen from ``device``)."""
        self.providers_requested = providers if providers is not None else select_providers(device)
        self.session = open_session(model_path, self.providers_requested, intra_op_threads, inter_op_threads, spin)
        self.providers = list(self.session.get_providers())
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or not {"features", "logits"} <= set(outputs):
            raise RuntimeSetupError(f"{model_path}: expected one input and outputs features, logits; "
                                f"got inputs {[i.name for i in inputs]} and outputs {outputs}")
        self.input_name = inputs[0].name
        dim0 = inputs[0].shape[0]
        self.max_batch_size = dim0 if isinstance(dim0, int) and dim0 > 0 else None
        self._outputs = ["features", "logits"]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """batch (N, 3, S, S) float32 C-contiguous -> (features (N, C, H, W), logits (N, K))."""
        if batch.dtype != np.float32 or not batch.flags.c_contiguous:
            batch = np.ascontiguousarray(batch, dtype=np.float32)
        features, logits = self.session.run(self._outputs, {self.input_name: batch})
        return features, logits

    def close(self) -> None:
        self.session = None


def run_any_batch(runtime: Runtime, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``runtime.run`` for a batch of any size N, also on a model exported with a fixed batch size
    (run in padded chunks of that size): (features (N, C, H, W), logits (N, K))."""
    fixed = runtime.max_batch_size
    if not fixed or len(batch) == fixed:
        return runtime.run(batch)
    feats, logits = [], []
    for s in range(0, len(batch), fixed):
        part = batch[s:s + fixed]
        n = len(part)
        if n < fixed:
            part = np.concatenate([part, np.zeros((fixed - n, *part.shape[1:]), part.dtype)])
        f, z = runtime.run(part)
        feats.append(f[:n])
        logits.append(z[:n])
    return np.concatenate(feats), np.concatenate(logits)


RuntimeFactory = Callable[..., Runtime]
_RUNTIMES: dict[str, RuntimeFactory] = {}


def register_runtime(name: str, factory: RuntimeFactory) -> None:
    """Make ``--runtime NAME`` create runtimes with ``factory(model_path=..., **settings)``."""
    _RUNTIMES[name] = factory


def available_runtimes() -> list[str]:
    return sorted(_RUNTIMES)


def create_runtime(name: str, model_path: str | os.PathLike, **settings) -> Runtime:
    """The runtime ``name`` for the model at ``model_path``; unknown names raise ValueError."""
    if name not in _RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; available: {', '.join(available_runtimes())}")
    return _RUNTIMES[name](model_path=model_path, **settings)


def _onnx_factory(model_path, device="auto", intra_op_threads=0, inter_op_threads=1, spin=False, **_):
    return OnnxRuntime(model_path, device=device, intra_op_threads=intra_op_threads,
                       inter_op_threads=inter_op_threads, spin=spin)


register_runtime("onnx", _onnx_factory)


def _torchserve_factory(model_path, **settings):
    from .runtime_torchserve import create  # TorchServe's gRPC client, imported only when asked for

    return create(model_path, **settings)


register_runtime("torchserve", _torchserve_factory)
