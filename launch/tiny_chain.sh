#!/usr/bin/env bash
# The whole recipe at toy size on CPU, each stage starting from the previous one's weights:
#   stage 1 -> stage 2 -> ODE pairs -> stage-3 ode -> stage-3 post -> export (EMA) -> a long video.
# Usage: bash launch/tiny_chain.sh [OUT_DIR]   (STEPS=N for the steps of each training phase; PAIRS=N for
#        N ODE pairs instead of one per caption of the tiny data)
set -euo pipefail
OUT=${1:-runs/tiny_chain}
STEPS=${STEPS:-40}
PAIRS=${PAIRS:-null}
PY=${PYTHON:-python}
mkdir -p "$OUT"
SHARDS=$($PY -c "from helios.config import compose; from helios.data.synthetic import synthetic_shards; \
print(synthetic_shards(compose([]), True))")

$PY -m helios.train stage=1 hydra.run.dir="$OUT/s1" trainer.max_steps="$STEPS" validation.enabled=false
$PY -m helios.train stage=2 hydra.run.dir="$OUT/s2" init_from="$OUT/s1" trainer.max_steps="$STEPS" \
    validation.enabled=false
$PY -m helios.ode_pairs teacher="$OUT/s2" shards="$SHARDS" output="$OUT/ode" "sampler.steps=[3,3,3]" \
    max_sequence_length=32 pairs="$PAIRS"
$PY -m helios.train stage=3 stage3=tiny_ode hydra.run.dir="$OUT/s3_ode" trainer.max_steps="$STEPS" \
    distill.teacher="$OUT/s1" distill.generator_init="$OUT/s2" distill.ode_pairs="$OUT/ode" validation.enabled=false
$PY -m helios.train stage=3 hydra.run.dir="$OUT/s3_post" trainer.max_steps="$STEPS" distill.teacher="$OUT/s1" \
    init_from="$OUT/s3_ode" distill.gan.start_step=2 distill.ema_start=0
$PY -m helios.export checkpoint="$OUT/s3_post" output="$OUT/helios_distilled" weights=ema
$PY -m helios.generate checkpoint="$OUT/s3_post" sampler=dmd prompt="a red circle moving right" num_frames=60 \
    output="$OUT/distilled.mp4"
echo "chain done: $OUT"
