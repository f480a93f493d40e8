#!/usr/bin/env bash
# Every GPU figure of bora-pyro in one call, on a machine with a CUDA GPU (this project's own
# machines have none). From the repository root, in an environment where the project is installed
# (pip install -e ".[test,examples]", with a CUDA build of torch):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default benchmarks/results/gpu
#
# 1. the GPU tests (tests/test_gpu.py: a fit on the GPU ends where the CPU fit does, the pinned
#    task store where the in-memory fit does, a bf16 fit beats the base), which fail rather than
#    skip here (BORA_PYRO_REQUIRE_GPU=1);
# 2. benchmarks/step_time.py on CUDA with a bf16 base, the task store in pinned host memory, at the
#    GPT-2-small and SmolLM2-135M shapes (store variants at D = 1, 100, 1000 only: its length on a
#    GPU is not known yet, and a lent GPU's commands stop at 10 min);
# 3. OUT_DIR/gpu_check.json: the device, the tests' outcome and both step tables in one file.
# Any failure stops the script with a non-zero exit code; nothing is skipped.
set -euo pipefail

out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
python - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check.sh needs a CUDA GPU; torch {torch.__version__} sees none")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
EOF

started=$(date +%s)
BORA_PYRO_REQUIRE_GPU=1 python -m pytest -p no:cacheprovider -q tests/test_gpu.py \
    --junitxml "$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log"
for shape in full smollm2; do
    python benchmarks/step_time.py --shape "$shape" --device cuda --base-dtype bfloat16 --store-backend host \
        --tasks 1 25 100 --store-tasks 1 100 1000 --store-disk-gb 20 --json "$out/step_time_${shape}_cuda.json" 2>&1 | tee "$out/step_time_${shape}_cuda.log"
done

python - "$out" "$started" <<'EOF'
import json
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

out, started = Path(sys.argv[1]), float(sys.argv[2])
suite = ElementTree.parse(out / "gpu_tests.xml").getroot().find("testsuite")
tests = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
if tests["failures"] or tests["errors"] or tests["skipped"] or not tests["tests"]:
    sys.exit(f"the GPU tests did not all pass: {tests}")
result = {
    "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
    "gpu_tests": tests,
    "step_time": {shape: json.loads((out / f"step_time_{shape}_cuda.json").read_text()) for shape in ("full", "smollm2")},
    "step_time_summary": {shape: json.loads((out / f"step_time_{shape}_cuda.summary.json").read_text())
                          for shape in ("full", "smollm2")},
    "minutes": round((time.time() - started) / 60, 1),
    "command": "bash benchmarks/gpu_check.sh",
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
EOF
