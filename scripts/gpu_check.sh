#!/usr/bin/env bash
# Issue 8's GPU check, on the lent GPU machine (the device tool), after scripts/gpu_wheels.sh here:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=540)
# SmolLM2-135M (random weights) on one GPU in bf16: LoRA under plain / FSDP / ZeRO-2 / ZeRO-3, then full
# tuning under plain / FSDP / ZeRO-3; each table (loss agreement, tokens/s, peak memory) lands in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, transformers, accelerate, peft, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$OUT/env.txt"
timeout 240 python3 benchmarks/bench_distributed.py --model .gpu/smol --steps 30 --batch 8 --bf16 --engines plain,fsdp,zero2,zero3 --out "$OUT/lora.md" 2>&1 | tee "$OUT/lora.log"
timeout 200 python3 benchmarks/bench_distributed.py --model .gpu/smol --steps 20 --batch 8 --bf16 --finetuning full --lr 1e-5 --engines plain,fsdp,zero3 --out "$OUT/full.md" 2>&1 | tee "$OUT/full.log"
