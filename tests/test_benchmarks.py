"""Every benchmark script still runs: its smallest mode, end to end, writing the ratios it promises.

Nothing here asserts a timing (the machines are noisy); a refactor that breaks a script fails here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> the ratios its --json must name (a dotted path: results.<B> for per-batch results)
PROMISED = {
    "decode_throughput.py": ["results.2.ratio_batched_over_generate", "results.2.ratio_decode_only_over_generate"],
    "env_throughput.py": ["results.4.ratio_env_over_bare", "results.4.ratio_env_over_bare_restarts",
                          "results.4.ratio_prompt_cache_speedup"],
    "processor_overhead.py": ["ratio_policy_over_plain", "ratio_guarded_over_unguarded"],
    "train_throughput.py": ["ratio_train_over_bare"],
    "ray_throughput.py": ["ratio_workers_over_one", "learner_share_one", "learner_share_workers"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(PROMISED))
def test_benchmark_smoke_run_writes_its_ratios(script, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--threads", "1",
                           "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUMMARY" in proc.stdout or script == "processor_overhead.py", proc.stdout[-2000:]
    payload = json.loads(out.read_text())
    for path in PROMISED[script]:
        value = payload
        for key in path.split("."):
            value = value[key]
        assert isinstance(value, float) and value > 0, (path, value)
