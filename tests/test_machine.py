"""Hardware detection (vaelab.machine) with the CPU mocked both ways, and `vaelab env`."""

import json
import platform
from pathlib import Path

import pytest
import torch

from vaelab import machine, speed
from vaelab.cli import main
from vaelab.config import ConfigError, TrainConfig

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


def mock_cpu(monkeypatch, cpuinfo: frozenset[str], torch_reports: set[str], arch="x86_64"):
    """A CPU whose /proc/cpuinfo lists ``cpuinfo`` and whose torch checks report
    ``torch_reports`` (names of machine.TORCH_CHECKS)."""
    monkeypatch.setattr(machine, "cpu_info", lambda *a: ("a mocked CPU", cpuinfo))
    for flag, name in machine.TORCH_CHECKS.items():
        monkeypatch.setattr(torch.cpu, name, lambda flag=flag: flag in torch_reports)
    monkeypatch.setattr(platform, "machine", lambda: arch)


@pytest.mark.parametrize(
    ("torch_reports", "native"),
    [({"avx2"}, False), ({"avx2", "avx512f"}, False), ({"avx2", "avx512f", "avx512_bf16"}, True),
     ({"avx2", "avx512f", "amx_tile"}, True)],
)  # fmt: skip
def test_auto_follows_the_capability_torch_reports(monkeypatch, torch_reports, native):
    mock_cpu(monkeypatch, frozenset(), torch_reports)  # no /proc/cpuinfo: torch alone decides
    assert machine.cpu_flags() == torch_reports
    tc = TrainConfig(precision="auto")
    precision, why = speed.resolve_precision(tc, torch.device("cpu"))
    assert precision == ("bf16" if native else "fp32")
    assert ("computes bf16 natively" in why) is native and ("emulates" in why) is not native


def test_an_emulated_precision_is_refused_in_one_line_unless_allowed(monkeypatch):
    mock_cpu(monkeypatch, frozenset({"avx2"}), {"avx2"})
    cpu = torch.device("cpu")
    for precision in ("bf16", "fp16"):
        with pytest.raises(ConfigError) as info:
            speed.resolve_precision(TrainConfig(precision=precision), cpu)
        line = str(info.value)
        assert "\n" not in line and line.startswith("config key 'train.precision': ")
        assert f"emulates {precision}" in line and "AVX" in line  # torch's capability named
        assert "use fp32 or auto" in line and "train.allow_emulated=true" in line
        allowed = TrainConfig(precision=precision, allow_emulated=True)
        got, why = speed.resolve_precision(allowed, cpu)
        assert got == precision and "although emulated" in why
    for precision in ("fp32", "fp64"):
        assert speed.resolve_precision(TrainConfig(precision=precision), cpu) == (precision, "")


def test_native_precisions_run_without_a_word(monkeypatch):
    mock_cpu(monkeypatch, frozenset({"avx512_bf16", "avx512_fp16"}), {"avx2"})  # cpuinfo's word
    cpu = torch.device("cpu")
    assert speed.resolve_precision(TrainConfig(precision="bf16"), cpu) == ("bf16", "")
    assert speed.resolve_precision(TrainConfig(precision="fp16"), cpu) == ("fp16", "")
    mock_cpu(monkeypatch, frozenset({"asimd", "asimdhp"}), set(), arch="aarch64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert speed.resolve_precision(TrainConfig(precision="fp16"), cpu) == ("fp16", "")
    with pytest.raises(ConfigError, match="no ARM bf16"):
        speed.resolve_precision(TrainConfig(precision="bf16"), cpu)
