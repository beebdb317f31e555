"""bf16 autocast on the CPU (cctuning/training/cpu.py): the bf16 units read from /proc/cpuinfo, and the
warning when --bf16 is asked for on a CPU that would emulate the bf16 matrix products."""

import logging

import pytest

from cctuning.training.cpu import cpu_flags, cpu_has_bf16_units, warn_cpu_bf16

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: x\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_the_flags_of_the_first_cpu(tmp_path):
    (tmp_path / "avx2").write_text(AVX2)
    (tmp_path / "spr").write_text(SAPPHIRE)
    (tmp_path / "none").write_text("processor\t: 0\n")
    assert cpu_flags(tmp_path / "avx2") == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert cpu_flags(tmp_path / "none") is None and cpu_flags(tmp_path / "missing") is None
    assert cpu_has_bf16_units(cpu_flags(tmp_path / "avx2")) is False
    assert cpu_has_bf16_units(cpu_flags(tmp_path / "spr")) is True
    assert cpu_has_bf16_units({"avx512_bf16"}) is True  # AVX512-BF16 without AMX


@pytest.mark.parametrize(
    "bf16, on_cpu, flags, warns",
    [
        (True, True, {"avx2"}, True),
        (True, True, {"avx2", "amx_bf16"}, False),
        (True, False, {"avx2"}, False),  # an accelerator runs the products
        (False, True, {"avx2"}, False),
    ],
)
def test_the_warning_only_where_bf16_would_be_emulated(bf16, on_cpu, flags, warns, caplog):
    with caplog.at_level(logging.WARNING, logger="cctuning.training.cpu"):
        assert warn_cpu_bf16(bf16, on_cpu, flags) is warns
    assert ("without bf16 matrix units" in caplog.text) is warns


def test_unknown_flags_do_not_warn(monkeypatch, caplog):
    monkeypatch.setattr("cctuning.training.cpu.cpu_flags", lambda: None)
    with caplog.at_level(logging.WARNING, logger="cctuning.training.cpu"):
        assert warn_cpu_bf16(True, True) is False
    assert not caplog.text
