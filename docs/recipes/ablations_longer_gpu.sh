#!/usr/bin/env bash
# Longer runs of the ablation table's variants, side by side on one GPU, with the ace-vit-tiny defaults otherwise.
# Each argument is one run, NAME:SEED:EPOCHS[:CONFIG_OVERRIDES]; without arguments, the four runs of 200 epochs
# (3,600 steps, 3.7x the default run): full ACE with seeds 0 and 1, global loss only and local loss only.
# Run from the repository root. RUNS receives the exported encoders (evaluate them with
# examples/run_evaluation.py: docs/results.md prints the commands), OUT the logs and one archive per run.
set -uo pipefail
OUT=${OUT:-ablations-out}
RUNS=${RUNS:-/tmp/ablations}
MIXED_PRECISION=${MIXED_PRECISION:-bf16}
if [ $# -eq 0 ]; then
    set -- ace:0:200 ace-seed1:1:200 global-only:0:200:local_loss_weight=0 local-only:0:200:global_loss_weight=0
fi
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-/tmp/hf-datasets}
start=$(date +%s)
python3 -c "from ace_hf.synthetic.datasets import build_default_dataset as b; b(300, 320)" > "$OUT/render.log" 2>&1 ||
    { tail -20 "$OUT/render.log"; exit 1; }
echo "rendered in $(( $(date +%s) - start )) s" | tee "$OUT/times.txt"

pretrain() {  # NAME:SEED:EPOCHS[:CONFIG_OVERRIDES]; archives the export when done
    IFS=: read -r name seed epochs overrides <<< "$1"
    accelerate launch --num_processes 1 --mixed_precision "$MIXED_PRECISION" examples/pretrain.py \
        --num_train_epochs "$epochs" --warmup_epochs 10 --logging_steps 200 --dataloader_num_workers 3 \
        --seed "$seed" ${overrides:+--config_overrides "$overrides"} --output_dir "$RUNS/$name" \
        > "$OUT/pretrain-$name.log" 2>&1
    tail -1 "$OUT/pretrain-$name.log"
    tar -C "$RUNS" -czf "$OUT/$name.tar.gz" --exclude checkpoints --exclude pretraining_heads.safetensors "$name"
}
for run in "$@"; do
    pretrain "$run" &
done
wait
echo "pretrained in $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
