#!/bin/bash
# One BioTorch LeNet cell (MNIST or Fashion-MNIST) with BioTorch's own trainer (benchmark.py),
# one thread.
# usage: BIOTORCH_CHECK=DEST run_cell.sh RULE LR SEED OUT_DIR [EPOCHS=100] [MILESTONES="50 75"]
# DEST from setup.sh; DATASET: mnist (default) or fashion_mnist; DATA_DIR (default
# ../shared/data/mnist or ../shared/data/fashion-mnist; MNIST_DIR is read too) holds the
# official .gz idx files.
# Writes OUT_DIR/config.yaml, OUT_DIR/train.log, OUT_DIR/run/ (BioTorch's outputs) and
# OUT_DIR/summary.json (summarize.py).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); D=${BIOTORCH_CHECK:?set BIOTORCH_CHECK to setup.sh\'s DEST}
RULE=$1; LR=$2; SEED=$3; OUT=$(realpath -m "$4"); EPOCHS=${5:-100}; MS=${6:-"50 75"}
DATASET=${DATASET:-mnist}
case $DATASET in mnist) SUB=mnist ;; fashion_mnist) SUB=fashion-mnist ;;
    *) echo "run_cell.sh: DATASET must be mnist or fashion_mnist, not $DATASET" >&2; exit 2 ;; esac
DATA=$(realpath "${DATA_DIR:-${MNIST_DIR:-$HERE/../../../../shared/data/$SUB}}")
"$D/venv/bin/python" "$HERE/gen_config.py" "$RULE" "$LR" "$SEED" "$EPOCHS" "$OUT" "$DATA" \
    --milestones $MS --dataset "$DATASET"
export PYTHONPATH="$HERE/stub:$D/src" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
cd "$D/src"
start=$(date +%s)
nice -n 19 "$D/venv/bin/python" -c "import torch; torch.set_num_threads(1)
import biotorch.benchmark.run as run; run.__main__()" --config_file "$OUT/config.yaml" \
    > "$OUT/train.log" 2>&1
echo "wall_seconds $(( $(date +%s) - start ))" >> "$OUT/train.log"
"$D/venv/bin/python" "$HERE/summarize.py" "$OUT"
