#!/bin/bash
# device call 3 of 3: assemble the GGUF, convert the preset, run the lr 1e-5 grid (seeds 1, 2; no generation)
# until the deadline; pack the small results into $OUT every minute and at the end
set -u
TOTAL=${1:-500}; START=$(date +%s); DEADLINE=$((START + TOTAL - 25))
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
true
true
echo "converted at +$(( $(date +%s) - START )) s"
pack() {
  find /tmp/gpu/lr1e-4 -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' -o -name '*.csv' \) \
    ! -name 'tokenizer*.json' ! -name 'vocab.json' ! -path '*/checkpoint-*' ! -path '*/data/*' > /tmp/files.txt 2>/dev/null
  tar czf $OUT/results.tgz.part -T /tmp/files.txt 2>/dev/null && mv $OUT/results.tgz.part $OUT/results.tgz
}
(while sleep 20; do echo "$(( $(date +%s) - START )) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"; done) > $OUT/gpu_util.log 2>&1 &
UTIL=$!
(while sleep 60; do pack; done) &
PACKER=$!
timeout -s INT $((DEADLINE - $(date +%s))) python3 -m cctuning.cli experiment --config .dev4/lr1e-4.yaml --output /tmp/gpu/lr1e-4 --cells sft,fixed-8,fixed-8-none --jobs 8 --no-progress > $OUT/lr1e-4.log 2>&1
echo "experiment rc $? at +$(( $(date +%s) - START )) s"
kill $UTIL $PACKER 2>/dev/null; sleep 1
pack; ls -la $OUT
tail -5 $OUT/lr1e-4.log
for f in /tmp/gpu/lr1e-4/jobs/*/stages.json; do echo "$f $(cat $f)"; done
