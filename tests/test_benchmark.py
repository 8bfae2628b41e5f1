"""tools.benchmark end to end on a CPU at toy sizes: every impl side by side, a failing case
reported in its row instead of ending the sweep, JSON and PNG written, the table printed last.
tools.tune likewise: every kernel's candidate tilings run (in the interpreter) and compute the same."""

import json
import subprocess
import sys

import pytest

from ops.sympow.triton.launch import Tiling
from tools import benchmark, tune


def test_benchmark_writes_json_and_plot_and_reports_failures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # Head dim 16 and one head keep the interpreted kernels quick; this tests the harness, not them.
    # chunk size 24 is no whole number of the Triton kernels' 16-row tiles: that case must fail alone.
    benchmark.main(
        [
            "--impls",
            "softmax",
            "attention",
            "chunked",
            "triton",
            "--seqs",
            "32",
            "64",
            "--chunk-sizes",
            "16",
            "24",
            "--dim",
            "16",
            "--heads",
            "1",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    labels = {r["impl"] for r in rows}
    assert labels == {"softmax", "attention", "chunked/16", "chunked/24", "triton/16", "triton/24"}
    failed = [r for r in rows if "error" in r]
    assert failed and all(r["impl"] == "triton/24" and "multiple of 16" in r["error"] for r in failed)
    assert all(r["seconds"] > 0 and r["tflops"] > 0 and r["bytes"] > 0 for r in rows if "error" not in r)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("| 64 | 1 | forward+backward | triton/24 | ValueError")
    assert "softmax time / this" in printed[-len(rows) - 2]


@pytest.mark.parametrize(
    "kernels, candidates, extra",
    [("chunked", "CHUNKED_CANDIDATES", {"both scans"}), ("attention", "ATTENTION_CANDIDATES", set())],
)
def test_tune_runs_each_kernels_candidates_and_they_compute_alike(
    tmp_path, capsys, monkeypatch, kernels, candidates, extra
):
    out = tmp_path / "tune.json"
    # One 32-row candidate per kernel keeps the interpreter quick; 40 tokens are a whole chunk (or
    # tile) of 32 and a partial one, so the masks at the sequence's end are crossed too.
    monkeypatch.setattr(tune, candidates, {kernel: [Tiling(32, 32, 4, 2)] for kernel in getattr(tune, candidates)})
    tune.main(["--kernels", kernels, "--seq", "40", "--chunk-sizes", "32", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    changed = {r["setting"].split(":")[0] for r in rows}
    assert changed >= {"defaults"} | extra | {kernel.__name__ for kernel in getattr(tune, candidates)}
    # 32-row tiles against the interpreter's 16: float32 summation order apart, the same numbers.
    assert all("error" not in r and r["seconds"] > 0 for r in rows)
    assert all(r["difference"] < 1e-5 for r in rows if r["setting"] != "defaults")
    assert capsys.readouterr().out.strip().splitlines()[-len(rows) - 2].startswith("| case | setting | ms |")


def test_a_sweep_past_its_time_limit_reports_the_rest_as_not_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--impls", "attention", "chunked", "--seqs", "32", "64", "--max-minutes", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and all(r["error"] == benchmark.TimeLimit.NOT_RUN for r in rows)
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"{benchmark.TimeLimit.NOT_RUN} | | | |")


def test_import_ops_brings_only_the_operator():
    """The benchmark, tuning and GPU-check tools, and what only they need (tqdm, matplotlib),
    stay out of a user's `import ops`."""
    listing = "import ops, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in NAMES))"
    names = ("tools", "tqdm", "matplotlib")
    result = subprocess.run(
        [sys.executable, "-c", f"NAMES = {names!r}; {listing}"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
