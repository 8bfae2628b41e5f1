"""ops.benchmark end to end on a CPU at toy sizes: every impl side by side, a failing case
reported in its row instead of ending the sweep, JSON and PNG written, the table printed last."""

import json

from ops import benchmark


def test_benchmark_writes_json_and_plot_and_reports_failures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # Head dim 16 and one head keep the interpreted kernels quick; this tests the harness, not them.
    # chunk size 24 is no whole number of the Triton kernels' 16-row tiles: that case must fail alone.
    benchmark.main(["--impls", "softmax", "attention", "chunked", "triton", "--seqs", "32", "64", "--chunk-sizes", "16", "24", "--dim", "16", "--heads", "1", "--repeats", "1", "--out", str(out)])
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
