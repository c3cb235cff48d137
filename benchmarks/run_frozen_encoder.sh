#!/usr/bin/env bash
# Frozen-encoder scores and the feature-matching attack on the offline Fashion-MNIST benchmark
# (docs/frozen_encoders.md, "Results on the offline benchmark"). No pretrained weights: the frozen encoder is the
# quickstart classifier (resnet10t, 2 epochs, seed 0), which has seen the ID training data.
# Resumable: a step whose ood_results.json exists is skipped (delete the folder to redo it).
#   bash benchmarks/run_frozen_encoder.sh        (2 CPU cores: 40-75 min, most of it the attack)
# Writes results/frozen_encoder/{encoder,frozen,attack}/ and prints the Markdown for the doc.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/frozen_encoder}
COMMON=(--trainer.logger=false --trainer.enable_progress_bar=false --ood_eval.print_table=false)

best() { ls "$1"/checkpoints/best-*.ckpt 2>/dev/null | head -1 || true; }

# 1. The encoder: the quickstart classifier, seed 0 (reused from benchmarks/run_results.sh when it exists).
ckpt=$(best results/fashionmnist/seed0)
[ -n "$ckpt" ] || ckpt=$(best "$OUT/encoder")
if [ -z "$ckpt" ]; then
  $PY train.py --config configs/quickstart.yaml --seed_everything 0 "${COMMON[@]}" \
    --trainer.default_root_dir "$OUT/encoder" --ood_eval.output_dir "$OUT/encoder"
  ckpt=$(best "$OUT/encoder")
fi
echo "encoder: $ckpt"

# 2. The frozen encoder's scores (knn, mahalanobis, rmd, linear_probe), no training.
if [ ! -f "$OUT/frozen/ood_results.json" ]; then
  $PY evaluate.py --config configs/frozen_encoder_fashionmnist.yaml "${COMMON[@]}" \
    --model.init_args.encoder.init_args.checkpoint "$ckpt" \
    --trainer.default_root_dir "$OUT/frozen" --ood_eval.output_dir "$OUT/frozen"
fi

# 3. The attack: 100 images per far-OOD set, smooth and patchy, with and without the targets in the k-NN bank.
if [ ! -f "$OUT/attack/ood_results.json" ]; then
  $PY evaluate.py --config configs/attack_fashionmnist.yaml "${COMMON[@]}" \
    --model.init_args.encoder.init_args.checkpoint "$ckpt" \
    --trainer.default_root_dir "$OUT/attack" --ood_eval.output_dir "$OUT/attack"
fi

$PY benchmarks/results_table.py "$OUT/frozen/ood_results.json" \
  --title "Frozen encoder (the quickstart resnet10t's features) on \`fashionmnist\`"
$PY benchmarks/attack_table.py "$OUT/attack/ood_results.json"
