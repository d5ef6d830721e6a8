#!/usr/bin/env bash
# Prepare .gpu/ (ignored by git) for scripts/gpu_check.sh, on this machine, before a GPU is used:
# the Python packages the GPU machine's image lacks, as wheels for its Python 3.12 at the versions
# installed here (tested together), and SmolLM2-135M's config and tokenizer (no weights: the check
# builds random ones there). Needs the .venv of scripts/setup.sh and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl
pins=$(.venv/bin/pip freeze | grep -iE '^(datasets|dill|multiprocess|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|hjson)==')
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl $pins
.venv/bin/pip wheel -q --no-deps -w .gpu/whl "deepspeed==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
.venv/bin/python - <<'PY'
import shutil
from pathlib import Path
from sftlab.model.assets import resolve_model

src, dst = Path(resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")), Path(".gpu/smol")
dst.mkdir()
for f in src.iterdir():
    if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")):
        shutil.copy2(f, dst / f.name)
PY
ls .gpu/whl .gpu/smol && du -sh .gpu
