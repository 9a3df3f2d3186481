"""The examples run as a user runs them (``python examples/...``, real gloo
processes) and print what they promise: the FSDP checkpoint tutorial, a
training job that resumes from its latest checkpoint on another world size,
and the demo (save on 4 ranks with FSDP2, resume on 2 with tensor
parallelism, everything bit-exact)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str | Path, timeout: float = 120) -> str:
    """Run ``examples/<name>`` and return its output; fail with it if it fails."""
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{name} exited with {completed.returncode}:\n{output}"
    return completed.stdout


def test_fsdp_checkpoint_tutorial(tmp_path: Path) -> None:
    output = run_example("fsdp_checkpoint.py", "--world-size", "2", "--dir", tmp_path)
    assert "saved the model and optimizer of 2 ranks" in output
    assert "loaded it on 2 ranks; the weights are the saved ones" in output
    assert (tmp_path / "checkpoint" / ".metadata.distcp").is_file()


def test_train_resume_continues_from_the_latest_committed_checkpoint(tmp_path: Path) -> None:
    common = ("--ckpt-dir", tmp_path, "--save-every", "2")
    first = run_example("train_resume.py", *common, "--steps", "4", "--world-size", "2")
    assert "starting at step 0 on 2 ranks" in first
    assert [line.split()[1] for line in first.splitlines() if line.startswith("saved")] == [
        str(tmp_path / "step-2"),
        str(tmp_path / "step-4"),
    ]
    (tmp_path / "step-8").mkdir()  # a save that crashed before its commit: passed over
    (tmp_path / "step-8" / "data-0.distcp").write_bytes(b"partial")

    second = run_example("train_resume.py", *common, "--steps", "6", "--world-size", "1")
    assert f"resumed from {tmp_path / 'step-4'} at step 4 on 1 rank (sample 64 of" in second
    steps = [int(line.split()[1]) for line in second.splitlines() if line.startswith("step ")]
    assert steps == [5, 6]
    assert "done: step 6" in second
    assert (tmp_path / "step-6" / ".metadata.distcp").is_file()


def test_train_resume_with_async_saves_from_a_writer_process_and_a_thread(tmp_path: Path) -> None:
    common = ("--ckpt-dir", tmp_path, "--save-every", "2")
    first = run_example(
        "train_resume.py", *common, "--steps", "4", "--world-size", "2", "--async-save", "process"
    )
    assert [line.split()[1] for line in first.splitlines() if line.startswith("saved")] == [
        str(tmp_path / "step-2"),
        str(tmp_path / "step-4"),
    ]
    assert first.index("saved " + str(tmp_path / "step-4")) < first.index("done: step 4")
    second = run_example(
        "train_resume.py", *common, "--steps", "6", "--world-size", "1", "--async-save", "thread"
    )
    assert f"resumed from {tmp_path / 'step-4'} at step 4 on 1 rank (sample 64 of" in second
    assert (tmp_path / "step-6" / ".metadata.distcp").is_file()


def test_demo_resumes_bit_exact_on_another_layout(tmp_path: Path) -> None:
    output = run_example("demo.py", "--dir", tmp_path, timeout=240)
    assert "check   model, optimizer, step, sampler vs the saved ones: bit-exact" in output
    assert "model + optimizer + step + sampler bit-exact after resharding" in output
    assert "match the uninterrupted run" in output
    assert "bytes read      1.00 x the bytes needed" in output
