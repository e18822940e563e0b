#!/bin/bash
# Prepare a run of BioTorch's own code (jsalbert/biotorch at 74fad0d) on LeNet/MNIST, to compare
# with biograd's cells of configs/biotorch/lenet_mnist.yaml (docs/results.md, section 1.2).
# usage: setup.sh BIOTORCH_REPO DEST   (BIOTORCH_REPO: a clone or bare git directory of it)
# Makes DEST/src (BioTorch, with the two fixes torch 2.13 needs) and DEST/venv (this project's
# .venv's packages plus pandas, jsonschema, tensorboard, which BioTorch imports).
set -euo pipefail
REPO=$1; DEST=$(realpath -m "$2"); HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
mkdir -p "$DEST/src"
git -C "$REPO" archive 74fad0d -- biotorch benchmark.py | tar -x -C "$DEST/src"
# torch >= 2.2: MultiStepLR has no `verbose` argument (it only printed the rate).
sed -i 's/gamma=gamma,$/gamma=gamma)/; /^ *verbose=True)$/d' "$DEST/src/biotorch/benchmark/lr_schedulers.py"
# torch >= 2.6: torch.load defaults to weights_only=True, which cannot load BioTorch's pickled model.
sed -i "s/'model_best_acc.pth'))/'model_best_acc.pth'), weights_only=False)/" \
    "$DEST/src/biotorch/benchmark/run.py"
grep -q "weights_only=False" "$DEST/src/biotorch/benchmark/run.py"
! grep -q "verbose=True" "$DEST/src/biotorch/benchmark/lr_schedulers.py"
"$ROOT/.venv/bin/python" -m venv "$DEST/venv"
# torch, numpy, Pillow, PyYAML and biograd come from the project's .venv (read only; addsitedir
# also reads its .pth files, among them biograd's editable install).
"$ROOT/.venv/bin/python" -c "import site; print(f'import site; site.addsitedir({site.getsitepackages()[0]!r})')" \
    > "$("$DEST/venv/bin/python" -c "import site; print(site.getsitepackages()[0])")/project.pth"
"$DEST/venv/bin/pip" install -q pandas jsonschema tensorboard
echo "ready: $HERE/run_cell.sh RULE LR SEED OUT_DIR (with BIOTORCH_CHECK=$DEST)"
