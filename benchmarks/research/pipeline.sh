#!/usr/bin/env bash
# One research checkpoint end to end: train it with the research code, import it twice (full
# weights; --narrow-weights for the exports), compare with the research model on the same test
# images, write a research-format result.json, export it to every target and verify it.
#
#   RESEARCH_REPO=/work/research benchmarks/research/pipeline.sh nin imagefolder:/work/data/cifar10-small runs/research/nin 3 1
#
# Arguments: MODEL DATA OUT [FLOAT_EPOCHS [QAT_EPOCHS [extra train_research.py options…]]].
# A checkpoint already in OUT/ckpt is reused (delete it to retrain). Every step runs on one thread,
# niced: this is a shared-machine benchmark, not a speed test.
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,10p "$0"; exit 2; }
model=$1 data=$2 out=$3 epochs=${4:-2} qat_epochs=${5:-1}
shift $(( $# < 5 ? $# : 5 ))
here=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1 PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
run() { echo "+ $*" >&2; nice -n 10 "$@"; }
ckpt=$out/ckpt/${model}_qat_preconvert.pth

[ -f "$ckpt" ] || run python "$here/train_research.py" "$model" "$out/ckpt" --data "$data" \
    --epochs "$epochs" --qat-epochs "$qat_epochs" "$@"
run deploykit import --research "$ckpt" --model "$model" --data "$data" --out "$out/full" --force
run deploykit import --research "$ckpt" --model "$model" --data "$data" --out "$out/narrow" --narrow-weights --force
run python "$here/compare.py" "$model" "$ckpt" "$out/full" --data "$data"
run python "$here/compare.py" "$model" "$ckpt" "$out/narrow" --data "$data"
run python "$here/hand_result.py" "$out/narrow" "$out/narrow/result_research.json"
run deploykit export --config "$out/narrow/result_research.json" --teacher "$out/narrow" --target all --force
# the codes are not tuned (research initial codes): the accuracy drop is not what is checked
run deploykit verify --exports "$out/narrow/exports" --max-drop 100 --threads 1
run python "$here/table.py" "$out"
