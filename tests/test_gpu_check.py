"""The GPU check's CPU form (`benchmarks/gpu_check.py --device cpu --small`), so the script that
whoever gets a GPU runs keeps working: every section runs and reports, its checks hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--device", "cpu", "--small", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["merge"]["checks"] == {"dare_ties twice, seed 7, on cpu": True}
    for method in ("ties", "dare_ties"):
        assert report["merge"][method]["seconds"] > 0 and report["merge"][method]["bytes"] > 0
    materialize = report["materialize"]
    for method in ("task_arithmetic", "ties", "dare_ties", "della"):
        for placement in ("device", "host"):
            assert materialize[method][placement]["times_a_copy_pass"] > 1
    assert len(materialize["checks"]) == 12 and all(materialize["checks"].values())
    scoring = report["scoring"]
    assert scoring["documents"] == 100 and scoring["tokens"] > scoring["documents"]
    assert scoring["probe"]["how"] == "cpu token budget" and scoring["decoding"] == "fast greedy"
    assert 0 < scoring["fitness"] <= 1
    search = report["search"]
    assert search["completed"] == search["trials"] == 8
    assert set(search["split"]) == {"materialize", "evaluate", "optimizer"}
    assert report["environment"]["torch"] and report["environment"]["lm_eval"] == "0.4.13"


def test_gpu_check_refuses_cuda_where_there_is_none(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "sees no CUDA device; use --device cpu --small" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "x").exists()
