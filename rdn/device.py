"""Where a run executes and what that hardware can do: device choice, the bf16 probe,
peak FLOP/s for MFU, peak memory.

Shared by training, evaluation and inference, so it depends on nothing in ``rdn`` but
:mod:`rdn.dist`.

Muon's orthogonalisation (a chain of batched matmuls, :func:`rdn.optim.polar_express`)
runs in bf16 on GPUs, where bf16 tensor cores make it cheap and the polynomials have the
slack for its rounding. On a CPU without native bf16 matrix instructions (AVX2-only x86)
a bf16 matmul is emulated and costs tens of times a float32 one, so there the same
iteration runs in float32. :func:`orthogonalization_dtype` makes that choice from what
torch reports about the machine, never from a timing.
"""

from __future__ import annotations

import logging
import resource
import sys
from dataclasses import dataclass

import torch

from rdn.dist import dist_info

log = logging.getLogger(__name__)

# bf16 dense peak FLOP/s by device name fragment (for MFU). Unknown devices -> MFU not reported.
PEAK_FLOPS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
}

ORTHOGONALIZATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``run.device`` -> a torch device (``auto``: CUDA, else MPS, else CPU)."""
    if name == "auto":
        if torch.cuda.is_available():
            return resolve_device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device: cuda requested but torch.cuda.is_available() is False")
    if name == "cuda" and dist_info().world_size > 1:
        return torch.device("cuda", torch.cuda.current_device())  # cuda:LOCAL_RANK, set by rdn.dist
    return torch.device(name)


def cpu_capability() -> str:
    """The SIMD level ATen dispatches CPU kernels to (``DEFAULT``, ``AVX2``, ``AVX512``, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 -- older or exotic builds: report, never fail
        return "unknown"


def cpu_bf16_matmul_native() -> bool:
    """Does oneDNN run bf16 matmuls with native instructions on this CPU (AVX512-BF16, AMX)?

    This is torch's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``); it honours
    ``ONEDNN_MAX_CPU_ISA``, so ``ONEDNN_MAX_CPU_ISA=AVX2`` shows the answer of an AVX2-only
    machine on a newer one."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 -- no mkldnn in this build: no native bf16 either
        return False


def orthogonalization_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``optim.orthogonalization_dtype`` -> the dtype Muon's Polar Express runs in.

    ``auto``: bf16 on CUDA and on a CPU with native bf16 matmul, float32 everywhere else
    (CPUs without it, MPS)."""
    if setting != "auto":
        if setting not in ORTHOGONALIZATION_DTYPES:
            raise ValueError(f"orthogonalization_dtype must be 'auto' or one of {sorted(ORTHOGONALIZATION_DTYPES)} "
                             f"(got {setting!r})")
        return ORTHOGONALIZATION_DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_bf16_matmul_native():
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class HardwareReport:
    """What a training stage says about its hardware at start (log line, MLflow params, meta)."""

    device: str
    cpu_capability: str
    bf16_matmul_native: bool
    orthogonalization_dtype: str

    def as_params(self) -> dict[str, str]:
        return {"device": self.device, "cpu_capability": self.cpu_capability,
                "bf16_matmul_native": str(self.bf16_matmul_native),
                "orthogonalization_dtype": self.orthogonalization_dtype}

    def line(self) -> str:
        return (f"device {self.device}, CPU capability {self.cpu_capability}, bf16 matmul "
                f"{'native' if self.bf16_matmul_native else 'not native'}, Muon orthogonalization in "
                f"{self.orthogonalization_dtype}")


def hardware_report(device: torch.device, ortho_dtype: torch.dtype) -> HardwareReport:
    native = device.type == "cuda" or (device.type == "cpu" and cpu_bf16_matmul_native())
    return HardwareReport(str(device), cpu_capability(), native, dtype_name(ortho_dtype))


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of this device, or None where unknown (CPU, MPS): MFU is then n/a."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20
