#!/bin/bash
# (the script that produced share_prompt_paths_2026-12-07_s18_cpu.txt; /tmp/dpo_demo_share holds a `qlora demo --method dpo` run)
# CPU A/B/C of --share-prompt paths on the DPO demo's pairs (same config as qlora demo --method dpo, 9 steps)
source /work/main/.venv/bin/activate
export PYTHONPATH=/tmp/abclone18
grep -m1 "model name" /proc/cpuinfo; grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
for i in 1 2; do for combo in sdpa:true eager:true sdpa:false eager:false; do
  att=${combo%%:*}; mode=${combo##*:}
  rm -rf /tmp/ab18_${att}_${mode}_$i
  qlora train --config /tmp/dpo_demo_share/run/config.yaml --output /tmp/ab18_${att}_${mode}_$i --share-prompt $mode \
    --attention $att --max-steps 9 --no-progress 2>&1 | grep -E "shared prompts|share-prompt|training:|reference log-probs|rror" | sed "s/^/[$att $mode $i] /"
  python3 - "$att" "$mode" "$i" <<'PY'
import json, sys
att, mode, i = sys.argv[1:]
rows = [json.loads(l) for l in open(f"/tmp/ab18_{att}_{mode}_{i}/metrics.jsonl") if '"loss"' in l]
last = rows[-1]
print(f"ab18 {att} share={mode} run {i}: steps {last.get('step')} tok_s {last.get('tokens_per_s', last.get('tok_s'))} loss {last['loss']:.5f}")
PY
done; done
