"""``normuon check``: the quick self-check passes on this CPU, and a failing check exits 1
naming it."""

from __future__ import annotations

from normuon import check
from normuon.cli import main


def test_quick_check_on_the_cpu_passes_and_writes_its_report(tmp_path, capsys):
    assert main(["check", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "check-cpu.md").read_text()
    assert "0 failed of" in text
    for section in ("correctness", "newton-schulz", "host syncs", "compile", "speed"):
        assert f"| {section} |" in text, section
    assert "NorMuon transposed float32 | pass" in text
    # GraphedStep's logic through its stand-in replay (the real CUDA graph: tests/test_cuda.py)
    assert "graphed step (stand-in replay) | pass" in text
    assert "graphed step (stand-in replay): load_state_dict, bf16 state | pass" in text
    assert "torch.optim.Muon" in text  # the peer timed beside it
    assert "| speed | bf16 Newton-Schulz dtype | - |" in text  # and why that dtype
    # What each Newton-Schulz bucket runs, and what its candidates took at plan time.
    assert "| speed | GPT-2 124M: Newton-Schulz kernels | - |" in text
    assert "(768, 768)" in text and " ms" in text
    assert "correctness: ok" in capsys.readouterr().out


def test_a_failing_check_exits_1_and_names_it(monkeypatch, capsys):
    monkeypatch.setattr(check, "_rel_err", lambda a, b: 1.0)  # every comparison off
    monkeypatch.setattr(check, "check_speed", lambda device, quick: [])
    monkeypatch.setattr(check, "check_compile", lambda device, quick=False: [])
    assert main(["check", "--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: correctness: NorMuon square float32" in out


def test_a_device_without_cuda_is_a_clear_error(monkeypatch, capsys):
    import torch

    # The error path of a torch build without CUDA, on any machine.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["check", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_sections_select_what_runs_and_unknown_ones_are_named(tmp_path, capsys):
    assert main(["check", "--device", "cpu", "--sections", "correctness", "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    text = (tmp_path / "check-cpu.md").read_text()
    assert "| correctness |" in text and "| compile |" not in text and "| speed |" not in text
    assert main(["check", "--sections", "correctness,spead"]) == 2
    assert "unknown ['spead']" in capsys.readouterr().err
