"""What a record says about the machine it ran on."""

from __future__ import annotations

import platform

import torch

from sdtune.records import cpu_name, device_description


def test_a_cpu_is_named_by_its_model_not_its_architecture(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n")
    assert cpu_name(cpuinfo) == "AMD EPYC 7B13"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # (e.g. an ARM board: no model name)
    assert cpu_name(cpuinfo) == (platform.processor() or platform.machine())
    assert cpu_name(tmp_path / "missing") == (platform.processor() or platform.machine())
    described = device_description(torch.device("cpu"))
    assert described["name"] == cpu_name() and described["torch_threads"] == torch.get_num_threads()
