#!/usr/bin/env bash
# One short GPU session: the CUDA tests, a few bf16 steps of examples/pretrain.py (plain, then under FSDP with
# the shipped config on the one GPU), and the pretraining benchmark (bf16: tiny, ACE ViT-B/32-448 and Swin-B,
# with torch.compile). Run from the repository root on a CUDA machine whose
# python3 has torch; OUT (default ./gpu-out) receives the logs and the benchmark's JSON and Markdown.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$OUT/gpu.txt"

timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"

python3 - <<'PY'
import numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
folder = Path("/tmp/gpu_images"); folder.mkdir(exist_ok=True)
for i in range(64):
    Image.fromarray((rng.random((320, 320)) * 65535).astype(np.uint16)).save(folder / f"{i:03d}.png")
PY
timeout 90 accelerate launch --num_processes 1 --mixed_precision bf16 examples/pretrain.py --train_dir /tmp/gpu_images \
    --max_steps 8 --logging_steps 2 --dataloader_num_workers 4 --output_dir /tmp/gpu_pretrain 2>&1 | grep -v Warning | tail -12 | tee "$OUT/pretrain.log"

timeout 90 accelerate launch --config_file examples/accelerate_configs/fsdp.yaml --num_processes 1 examples/pretrain.py \
    --train_dir /tmp/gpu_images --max_steps 8 --logging_steps 2 --checkpointing_steps 4 --dataloader_num_workers 4 \
    --output_dir /tmp/gpu_pretrain_fsdp 2>&1 | grep -v Warning | tail -12 | tee "$OUT/pretrain_fsdp.log"

timeout 330 python3 -m benchmarks.bench_pretraining --presets ace-vit-tiny ace-vit-b ace-swin-b --device cuda \
    --dtype bf16 --compile --output_json "$OUT/bench.json" --output_md "$OUT/bench.md" 2>&1 | tail -60 | tee "$OUT/bench.log"
