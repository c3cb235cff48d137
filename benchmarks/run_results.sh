#!/usr/bin/env bash
# Train the quickstart classifier with 3 seeds on both offline Fashion-MNIST benchmarks, then aggregate.
# Writes results/<benchmark>/seed<k>/ood_results.json and prints the Markdown for docs/results.md.
#   bash benchmarks/run_results.sh            (about 6 x 5 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
for bench in fashionmnist fashionmnist_openset; do
  for seed in $SEEDS; do
    out=results/$bench/seed$seed
    if [ -f "$out/ood_results.json" ]; then echo "skip $out (done)"; continue; fi
    $PY train.py --config configs/quickstart.yaml --data configs/data/$bench.yaml \
      --seed_everything "$seed" --trainer.logger=false --trainer.default_root_dir "$out" \
      --trainer.enable_progress_bar=false --ood_eval.output_dir "$out" --ood_eval.print_table=false
  done
done
for bench in fashionmnist fashionmnist_openset; do
  $PY benchmarks/results_table.py results/$bench/seed*/ood_results.json \
    --title "Classifier (resnet10t, quickstart recipe) on \`$bench\`"
done
