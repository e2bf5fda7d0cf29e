#!/bin/bash
# One GPU call: the reference stack (transformers + bitsandbytes + peft) and Unsloth on a shape, then ours on the
# same shape with --memory-budget off, at Unsloth's measured peak, 24GiB and auto; one table (bench/train_speed.py).
# Usage: bash bench/peers_same_call.sh PEERDIR WHEELS SIZE SEQ BATCH STEPS [OUTDIR] [BUDGETS]
#   PEERDIR: a copy of ../shared/bench (the GPU machine gets only the repository); WHEELS: its make_wheels.sh folder.
#   The reference row runs only when /tmp/reference_SIZE (the random checkpoint Unsloth loads) is missing.
#   e.g. bash bench/peers_same_call.sh .peerbench .pw 8b 2048 2 8 $OUT
P=$1 W=$2 SIZE=$3 SEQ=$4 BATCH=$5 STEPS=$6 O=${7:-.} BUDGETS=${8:-off,peer,24GiB,auto}
export PYTHONUNBUFFERED=1
[ -d /tmp/site_a ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_a \
  "$W"/bitsandbytes-*.whl || exit 1
[ -d /tmp/site_c ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_c \
  "$W"/*.whl || exit 1
F=$O/peers_${SIZE}_${SEQ}x${BATCH}.txt
: > "$F"
if [ ! -d /tmp/reference_$SIZE ]; then
  echo "== reference" >> "$F"
  PYTHONPATH=/tmp/site_a python3 "$P/reference_qlora.py" $SIZE $SEQ $BATCH 4 qlora 2>&1 | grep -E '^\{|Error' >> "$F"
fi
echo "== unsloth" >> "$F"
PYTHONPATH=/tmp/site_c python3 "$P/peers/unsloth_qlora.py" $SIZE $SEQ $BATCH $STEPS 2>&1 | grep -E 'RESULT|Error' >> "$F"
cat "$F"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 bench/train_speed.py --shape $SIZE --seq $SEQ --batch $BATCH --steps $STEPS --memory-budget $BUDGETS --peers "$F" \
  2>&1 | tee "$O/ours_${SIZE}_${SEQ}x${BATCH}.txt" | grep -v '^{'
