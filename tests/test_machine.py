"""Hardware detection (vaelab.machine) with the CPU mocked both ways, and `vaelab env`."""

import json
from pathlib import Path

import pytest
import torch

from vaelab import machine
from vaelab.cli import main

AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma bmi2
"""
AVX512_BF16 = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
SAPPHIRE = """model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 avx512f avx512_fp16 amx_tile amx_bf16 amx_int8
"""
ARM_BF16 = """processor\t: 0
Features\t: fp asimd evtstrm aes sve bf16 i8mm
CPU implementer\t: 0x41
"""
ARM_NO_BF16 = """processor\t: 0
Features\t: fp asimd evtstrm aes crc32
"""


@pytest.mark.parametrize(
    ("text", "arch", "model", "native"),
    [
        (AVX2_ONLY, "x86_64", "AMD EPYC 7B13", False),
        (AVX512_BF16, "x86_64", "AMD EPYC 9B14", True),
        (SAPPHIRE, "x86_64", "Intel(R) Xeon(R) Platinum 8480+", True),
        (ARM_BF16, "aarch64", "", True),
        (ARM_NO_BF16, "aarch64", "", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, text, arch, model, native):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    found_model, flags = machine.cpu_info(str(path))
    assert found_model == model
    assert machine.native_bf16(flags, arch) is native
    precision, why = machine.fast_precision("cpu", flags, arch)
    assert precision == ("bf16" if native else "fp32")
    assert ("natively" in why) is native


def test_only_the_flags_that_matter_are_kept(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(AVX512_BF16)
    assert machine.cpu_info(str(path))[1] == {"avx2", "avx512f", "avx512_bf16"}
    assert machine.cpu_info(str(tmp_path / "missing")) == ("", frozenset())


def test_a_gpu_with_bf16_gets_bf16_and_one_without_gets_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert machine.fast_precision("cuda", frozenset(), "x86_64") == (
        "bf16",
        "NVIDIA H200 computes bf16 natively",
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert machine.fast_precision("cuda", frozenset(), "x86_64")[0] == "fp32"


def test_matmul_rate_is_a_positive_rate():
    assert machine.matmul_rate(torch.float32, 64, budget=0.01) > 0


def test_vaelab_env_prints_the_facts(capsys):
    assert main(["env", "--json", "--no-measure"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["torch"] == torch.__version__
    assert found["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert found["suggested_precision"] in ("fp32", "bf16")
    if found["arch"] == "x86_64":  # read /proc/cpuinfo here, independently of vaelab.machine
        words = set(Path("/proc/cpuinfo").read_text().split())
        assert found["native_bf16"] == bool(words & {"avx512_bf16", "amx_bf16"})
        assert ("avx2" in found["cpu_flags"]) == ("avx2" in words)
    assert "cpu_matmul_gflops" not in found
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "cpu matmul    fp32" in text and "precision     train.precision=" in text
