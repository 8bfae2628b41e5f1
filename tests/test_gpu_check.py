"""The GPU check's dry run (bash scripts/gpu_checks.sh --dry-run), as the suite's guard that the
one command prepared for the lent GPU machine still runs: every stage at toy sizes in Triton's
interpreter, results.json rewritten as it goes, the table printed last; and its deadline."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["launch", "precision", "speed", "p4", "tune"]


def dry_run(out: Path, minutes: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "MINUTES": minutes, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        ["bash", "scripts/gpu_checks.sh", "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_dry_run_runs_every_stage_and_prints_the_table_last(tmp_path):
    result = dry_run(tmp_path, "7")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["stages"]) == STAGES and results["dry_run"]
    rows = [row for stage in STAGES for row in results["stages"][stage]]
    assert all(row["ok"] for row in rows if not row["case"].startswith("retention"))
    assert any("skipped in the dry run" in row["result"] for row in results["stages"]["speed"])
    launched = [row["case"] for row in results["stages"]["launch"]]
    assert any("states stage alone" in case for case in launched) and any("outputs stage alone" in c for c in launched)
    assert (tmp_path / "tune.json").exists()
    table = result.stdout.strip().splitlines()
    assert table[-1].startswith("| tune | tune | yes |")
    assert sum(line.startswith("| ") for line in table[-len(rows) - 2 :]) == len(rows) + 1


def test_no_stage_starts_past_the_deadline(tmp_path):
    result = dry_run(tmp_path, "0")
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert all(rows == [dict(case=stage, ok=None, result="not run: deadline")] for stage, rows in stages.items())


def test_a_kernel_that_fails_to_launch_stops_the_check(tmp_path, monkeypatch, capsys):
    from tools import gpu_check

    def precision_row(name, p, *args):
        if name == "chunked kernels":
            raise RuntimeError("CUDA error: no kernel image is available")
        return dict(case=f"{name} p={p}", ok=True, result="fine")

    monkeypatch.setattr(gpu_check, "precision_row", precision_row)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    stages = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert [row["ok"] for row in stages["launch"]] == [False] + [True] * 6  # the stages alone, groups still run
    assert "RuntimeError: CUDA error" in stages["launch"][0]["result"]
    assert all(stages[stage][0]["result"] == "not run: a kernel family failed to launch" for stage in STAGES[1:])
    assert "| launch | chunked kernels p=2 | NO | RuntimeError" in capsys.readouterr().out


def test_a_grouped_case_that_fails_to_launch_does_not_stop_the_check(tmp_path, monkeypatch):
    """Grouped heads are checked after the kernel families with equal heads, and a failure there
    leaves the precision and speed figures of a scarce GPU run to be taken."""
    from tools import gpu_check

    def precision_row(name, p, *args):
        if "grouped" in name:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return dict(case=f"{name} p={p}", ok=True, result="fine")

    def later_stage(*args):
        return [dict(case="later", ok=True, result="ran")]

    monkeypatch.setattr(gpu_check, "precision_row", precision_row)
    for stage in ("stage_speed", "stage_p4", "stage_tune"):
        monkeypatch.setattr(gpu_check, stage, later_stage)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    stages = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert [row["ok"] for row in stages["launch"]] == [True] * 5 + [False, False]
    assert all(stages[stage] == [dict(case="later", ok=True, result="ran")] for stage in ("speed", "p4", "tune"))
