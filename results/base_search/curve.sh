#!/bin/bash
# Issue 12 search, step 1: does the quick-profile base learn if it trains longer? A learning curve.
set -e
# Outputs go to runs/search/ (ignored); the eval JSONs were copied to results/base_search/.
cd "$(dirname "$0")/../.."  # the repo root
PY=.venv/bin/python
S=${S:-runs/search}  # lever runs: S=runs/search32 VQ_FLAGS=... BASE_FLAGS=... (see README.md)
D=$S/data
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 JAX_PLATFORMS=cpu JAX_COMPILATION_CACHE_DIR=$S/.jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
t0=$(date +%s)
# (another image size: the VQ stage builds its dataset on first use)
[ -n "$VQ_FLAGS" ] || [ -e $S/.data_done ] || { $PY tools/build_dataset.py --dataset=shapes_world --data_dir=$D && touch $S/.data_done; }
echo "data $(( $(date +%s)-t0 )) s"
[ -e $S/.vq_done ] || { $PY tools/train.py --config=configs/vq_shapes.py:f8 --workdir=$S/vq --config.data.data_dir=$D $VQ_FLAGS && touch $S/.vq_done; }
echo "vq $(( $(date +%s)-t0 )) s"
STEPS=${STEPS:-1200}
B=$S/base_$STEPS
$PY tools/train.py --config=configs/base_shapes.py:vq=$S/vq,vqarg=f8,steps=$STEPS --workdir=$B \
  --config.data.data_dir=$D --config.checkpoint.every_steps=300 --config.checkpoint.keep=20 $BASE_FLAGS > $S/base_$STEPS.log 2>&1
echo "base $(( $(date +%s)-t0 )) s"
for step in $(ls $B/checkpoints | grep -E '^[0-9]+$' | sort -n); do
  [ "$step" = 0 ] && continue
  [ -e $S/eval_${STEPS}_$step.json ] && continue
  $PY tools/evaluate.py --workdir=$B --step=$step --data_dir=$D "--config.eval.umm.parts=('cvbench',)" \
    "--config.eval.umm.splits=('test',)" --config.eval.umm.mcq_items=128 > $S/eval_${STEPS}_$step.log 2>&1
  cp $B/eval/metrics.json $S/eval_${STEPS}_$step.json
  echo "eval $step $(( $(date +%s)-t0 )) s"
done
