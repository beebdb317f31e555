#!/usr/bin/env bash
# Pack the small results of an experiment folder into a .tgz, so that they can outlive the machine
# (committed under docs/results, or brought back from a lent GPU) and be restored with
#   tar xzf OUT.tgz -C BASE
# after which `cctuning experiment` skips every training and evaluation they finish.
#
#   scripts/pack_results.sh [-C BASE] [--matrices] FOLDER OUT.tgz
#
# FOLDER is taken relative to BASE (default: the current folder) and kept as the archive's path.
# Packed: json, jsonl, md, log and csv files; not tokenizer files, checkpoints, or the runner's data/
# folders (it rebuilds them from the seed). --matrices adds each training's Transform Matrix
# (transform_matrix.safetensors, about 1.3 MB for SmolLM2), which a transform cell still to be
# evaluated needs. The archive is written to OUT.tgz.part and renamed: never half-written.
set -euo pipefail
base=. matrices=0
while [ $# -gt 0 ]; do
    case $1 in
        -C) base=$2; shift 2 ;;
        --matrices) matrices=1; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
[ $# -eq 2 ] || { echo "usage: $0 [-C BASE] [--matrices] FOLDER OUT.tgz" >&2; exit 2; }
folder=$1 out=$2
[ -d "$base/$folder" ] || { echo "$0: $base/$folder: no such folder" >&2; exit 2; }
list=$(mktemp)
trap 'rm -f "$list"' EXIT
names=(-name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' -o -name '*.csv')
[ $matrices = 1 ] && names+=(-o -name transform_matrix.safetensors)
(cd "$base" && find "$folder" -type f \( "${names[@]}" \) ! -name 'tokenizer*.json' ! -name 'vocab.json' \
    ! -path '*/checkpoint-*' ! -path '*/data/*' | LC_ALL=C sort) >"$list"
tar czf "$out.part" -C "$base" -T "$list"
mv "$out.part" "$out"
echo "$out: $(wc -l <"$list") files, $(du -h "$out" | cut -f1)"
