"""rdn.device: the orthogonalization dtype choice and the hardware report.

The bf16 probe is replaced by a stub in each test, so the choice is checked for both kinds
of CPU on any machine; the expected dtypes are the rule the issue states (bf16 where the
hardware has native bf16 matmul, float32 where it has not), written out here.
"""

from __future__ import annotations

import pytest
import torch

import rdn.device as device_mod
from rdn.device import hardware_report, orthogonalization_dtype

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.fixture
def probe(monkeypatch):
    """Set what the bf16 probe answers; records how often it was asked."""
    calls = []

    def set_answer(native: bool):
        def fake() -> bool:
            calls.append(native)
            return native
        monkeypatch.setattr(device_mod, "cpu_bf16_matmul_native", fake)
        return calls
    return set_answer


def test_auto_on_cpu_follows_the_bf16_probe(probe):
    probe(False)
    assert orthogonalization_dtype("auto", CPU) == torch.float32
    probe(True)
    assert orthogonalization_dtype("auto", CPU) == torch.bfloat16


@pytest.mark.parametrize("native", [False, True])
def test_auto_on_cuda_is_bf16_whatever_the_cpu(probe, native):
    probe(native)
    # Only device.type is read, so a CUDA device object works without a GPU.
    assert orthogonalization_dtype("auto", CUDA) == torch.bfloat16
    assert orthogonalization_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16


def test_auto_on_mps_is_float32(probe):
    probe(True)  # the host CPU's bf16 support says nothing about the MPS device
    assert orthogonalization_dtype("auto", MPS) == torch.float32


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("device", [CPU, CUDA])
def test_explicit_settings_are_honoured(probe, native, device):
    calls = probe(native)
    assert orthogonalization_dtype("float32", device) == torch.float32
    assert orthogonalization_dtype("bfloat16", device) == torch.bfloat16
    assert calls == []  # an explicit setting never consults the hardware


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="orthogonalization_dtype.*'float16'"):
        orthogonalization_dtype("float16", CPU)


@pytest.mark.parametrize("native", [False, True])
def test_hardware_report_on_cpu(probe, native):
    probe(native)
    dtype = torch.bfloat16 if native else torch.float32
    report = hardware_report(CPU, dtype)
    assert report.device == "cpu"
    assert report.bf16_matmul_native is native
    assert report.orthogonalization_dtype == ("bfloat16" if native else "float32")
    assert report.cpu_capability == str(torch.backends.cpu.get_cpu_capability())
    params = report.as_params()
    assert params == {"device": "cpu", "cpu_capability": report.cpu_capability,
                      "bf16_matmul_native": str(native), "orthogonalization_dtype": report.orthogonalization_dtype}
    line = report.line()
    assert report.cpu_capability in line and report.orthogonalization_dtype in line
    assert ("not native" in line) is (not native)


def test_hardware_report_on_cuda_counts_bf16_as_native(probe):
    probe(False)  # the host CPU has none; the GPU does
    report = hardware_report(CUDA, torch.bfloat16)
    assert report.bf16_matmul_native is True
    assert report.device == "cuda" and report.orthogonalization_dtype == "bfloat16"


def test_real_probe_answers_a_bool():
    assert isinstance(device_mod.cpu_bf16_matmul_native(), bool)
    assert device_mod.cpu_capability() != ""
