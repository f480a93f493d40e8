"""The examples run end to end in quick mode."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_shakespeare_quick(tmp_path):
    out = tmp_path / "results"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "shakespeare_speakers.py"), "--quick", "--out", str(out),
         "--cache-dir", str(tmp_path / "cache")],
        check=True, timeout=600, cwd=ROOT,
    )
    results = json.loads((out / "results.json").read_text())
    assert [entry["tau"] for entry in results["sweep"]] == [0.0, 100.0, "inf"]
    assert len(results["tasks"]) == 25
    for entry in results["sweep"] + [results["mean_field"]]:
        assert set(entry["tasks"]) == set(results["tasks"]) and entry["perplexity"] > 1
    assert {"results.md", "perplexity_vs_tau.png", "improvement_vs_size.png", "distance_vs_size.png"} <= {
        p.name for p in out.iterdir()
    }
