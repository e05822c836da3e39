#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one run, plus the test suite on a CUDA machine.
#
#   OUT=gpu-out bash bench/gpu_rows.sh
#   ONLY="repa fill" REPA_LIMIT=280 FILL_LIMIT=280 OUT=gpu-out2 bash bench/gpu_rows.sh
#
# ONLY picks a subset of pytest, repa, noise, textstream, fill (default: all), e.g. to rerun the
# compiled training rows with longer limits in a second device call.
# Runs, each under its own time limit, logging to $OUT/gpu.log and writing JSON beside it:
#   repa_train     bench/repa.py --section train --train-size real --compile --channels-last
#                  (SD 1.5's U-Net, batch 128, cached teacher tokens; eager, then compiled as
#                  `repa train` with compile + channels_last; falls back to batch 64 on OOM)
#   noise_realsize bench/noise_realsize.py --compile (SDXL-Turbo size, CLIP ViT-L/14 reward;
#                  eager, then compiled B = 1 with cold start and break-even)
#   textstream     bench/textstream.py --sd3-medium (forward overhead, bf16)
#   fill_train     bench/fill_train.py --flux-size --compile (FLUX.1-Fill-dev size, bf16,
#                  checkpointing; eager, then compiled as `fill train` with compile: true)
#   pytest         the whole suite on the CUDA machine (after the benches, with the time left)
# then bench/rows.py writes one JSON per measured row into bench/results/ (commit them).
# A device call brings back only $OUT, at most 8 files: this script writes 7 there (gpu.log,
# run_info.json, the 4 bench JSONs, pytest.log). Make the rows from that folder here with
# `python bench/rows.py --from FOLDER`: run_info.json (written first) gives them the GPU
# machine's date and versions, not this machine's.
# Packages the machine lacks can travel as wheels in .whl/ (installed into $TMPDIR/site first):
# the GPU image has no diffusers, lmdb or ftfy, so every bench fails without them. Fill .whl/
# here with `bash bench/gpu_wheels.sh` and name .whl in the device call's carry.
#
# GPU_ROWS_REHEARSAL=1 bash bench/gpu_rows.sh: a rehearsal on this machine's CPU (no GPU): the
# same command lines, each with its bench's own small-size options appended (`TINY` below; they
# win, argparse keeps an option's last value) and --device cpu; OUT defaults to
# .gputmp/rehearsal and RESULTS to .gputmp/rehearsal-results (rows.py writes none for a CPU
# run), the suite and .whl/ (the GPU image's wheels) are left out, the limits are longer, and
# torch.compile is off (TORCH_COMPILE_DISABLE=1: the benches' compiled branches run eagerly;
# REHEARSAL_COMPILE=1 keeps inductor, which takes tens of minutes on a small CPU). Everything
# but the CUDA-only calls runs (tests/test_bench_gpu.py).
set -u
REHEARSAL=${GPU_ROWS_REHEARSAL:-0}
if [[ $REHEARSAL == 1 ]]; then
    OUT=${OUT:-.gputmp/rehearsal}
    RESULTS=${RESULTS:-.gputmp/rehearsal-results}
    ONLY=${ONLY:-repa noise textstream fill}
    CALL_LIMIT=${CALL_LIMIT:-1800}
    : "${REPA_LIMIT:=600}" "${NOISE_LIMIT:=600}" "${TEXT_LIMIT:=300}" "${FILL_LIMIT:=300}"
    [[ ${REHEARSAL_COMPILE:-0} == 1 ]] || export TORCH_COMPILE_DISABLE=1
fi
# the rehearsal's options per run name (appended to the command line)
declare -A TINY=(
    [repa_train]="--device cpu --train-size small --train-batch-size 2 --repeats 1"
    [repa_train_b64]="--device cpu --train-size small --train-batch-size 2 --repeats 1"
    [noise_realsize]="--device cpu --width-div 16 --steps 1 --repeats 1 --batches 1"
    [textstream]="--device cpu --layers 4 --heads 2 --image-tokens 64 --text-tokens 16 \
        --batch 1 --reps 1 --warmup 1"
    [fill_train]="--device cpu --train-layers 1 --train-single-layers 1 --train-heads 1 \
        --train-panel 32 --train-text-tokens 8 --train-rounds 1"
)
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFALIGN_NO_PROGRESS=1
export MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
# temporaries (tiny models of the tests, wheels) on the checkout's disk: /tmp filled up there
export TMPDIR=${GPU_TMPDIR:-$PWD/.gputmp}
mkdir -p "$TMPDIR"
df -h /tmp "$TMPDIR" | tee -a "$OUT/gpu.log"
if [[ $REHEARSAL != 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$TMPDIR/site" .whl/*.whl || exit 1
    export PYTHONPATH=$TMPDIR/site:$PWD/src
else
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # (a caller's path kept after it)
fi
# Every limit is capped by what is left of the call (CALL_LIMIT, default 590 s: the device tool
# allows 600 s a command), keeping 15 s for bench/rows.py, so the script always ends inside the
# call with its rows written. The default limits add up to 520 s (repa 150, noise 200, text 60,
# fill 110; repa's batch-64 retry only spends what its first attempt left of REPA_LIMIT); the
# suite runs AFTER the benches (beside them it would share the GPU and skew the timings and the
# compile times) with the time that is left, when at least PYTEST_MIN (60) seconds are.
# Each bench writes its eager JSON before it compiles (fill_train also its compiled row variant
# before the LoRA-only one compiles), so a limit hit during a compile keeps what was measured
# and bench/rows.py reports the eager row (details.measured says which). An old JSON of a bench
# is removed before it runs: a failed bench leaves no row, never the previous run's.
# Risk, from the CPU smoke runs (2 loaded cores, 2026-12-07): compiling the step forward and
# backward took 429 s for the small U-Net (repa, regional + heads) and 280 s + 86 s for the
# 1 + 1-block FLUX (fill: the same graphs at any width); tracing and code generation run on the
# host's CPU, so on a GPU machine expect tens of seconds to minutes: if REPA / FILL stop at their
# limits, rerun them alone with ONLY (above) and longer limits.
ONLY=${ONLY:-pytest repa noise textstream fill}
ONLY=${ONLY//,/ }  # "repa,fill" = "repa fill"
CALL_LIMIT=${CALL_LIMIT:-590}
want() { [[ " $ONLY " == *" $1 "* ]]; }
log() { echo "$@" | tee -a "$OUT/gpu.log"; }
left() { echo $((CALL_LIMIT - SECONDS - 15)); }  # seconds this call has left for work
run() {  # run NAME SECONDS CMD...: time-limited (capped by `left`), output appended to the log
    local name=$1 limit=$2
    shift 2
    local cap
    cap=$(left)
    ((cap < limit)) && limit=$cap
    if ((limit < 10)); then
        log "== $name skipped: ${limit}s left of the call"
        return 124
    fi
    local extra=()
    if [[ $REHEARSAL == 1 ]]; then
        read -r -a extra <<<"${TINY[$name]:-}"
    fi
    log "== $name (limit ${limit}s): $* ${extra[*]}"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" "${extra[@]}" >>"$OUT/gpu.log" 2>&1
    local rc=$?
    log "== $name rc=$rc in $((SECONDS - t0))s"
    return $rc
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/gpu.log"
# the date and versions (torch, cuda, diffusers, transformers, peft, accelerate, lmdb: null when
# missing; driver) into the log and $OUT/run_info.json
$PY bench/rows.py --write-run-info "$OUT/run_info.json" 2>&1 | tee -a "$OUT/gpu.log"

# --no-online: the online-teacher variant (+38 %, measured before: BENCHMARKS R) is not the row,
# and its ~20 s (ViT-L/14 build, timings, FLOP count) go to the U-Net's compile instead.
# The batch-64 retry only when batch 128 ran out of memory before its eager JSON was written.
if want repa; then
    rm -f "$OUT/repa_train.json"
    REPA_T0=$SECONDS
    LOG_LINES=$(wc -l <"$OUT/gpu.log")
    run repa_train "${REPA_LIMIT:-150}" $PY bench/repa.py --section train \
        --train-size real --train-batch-size 128 --repeats 5 --no-online --compile \
        --channels-last --json "$OUT/repa_train.json" \
        || { [ ! -s "$OUT/repa_train.json" ] \
            && tail -n +"$((LOG_LINES + 1))" "$OUT/gpu.log" | grep -q "out of memory" \
            && run repa_train_b64 "$((${REPA_LIMIT:-150} - (SECONDS - REPA_T0)))" $PY \
            bench/repa.py --section train --train-size real --train-batch-size 64 --repeats 5 \
            --no-online --compile --channels-last --json "$OUT/repa_train.json"; }
fi
# --compile: the compiled B = 1 run after the eager ones (issue 18's row; the eager JSON is
# written first, so a limit hit while compiling keeps the eager rows)
if want noise; then
    rm -f "$OUT/noise_realsize.json"
    run noise_realsize "${NOISE_LIMIT:-200}" $PY bench/noise_realsize.py \
        --device cuda --dtype bfloat16 --steps 5 --repeats 3 --batches 1,4 --compile \
        --json "$OUT/noise_realsize.json"
fi
if want textstream; then
    rm -f "$OUT/textstream.json"
    run textstream "${TEXT_LIMIT:-60}" $PY bench/textstream.py --sd3-medium \
        --device cuda --dtype bfloat16 --skip-memory --reps 10 --json "$OUT/textstream.json"
fi
# --compile: FLUX's two block classes compiled regionally, forward and backward; the LoRA-only
# variant compiles once more (its input tokens need no gradient), after the row's is saved
if want fill; then
    rm -f "$OUT/fill_train.json"
    run fill_train "${FILL_LIMIT:-110}" $PY bench/fill_train.py --flux-size \
        --device cuda --dtype bfloat16 --train-rounds 3 --compile --json "$OUT/fill_train.json"
fi
# one JSON per measured row (bench/results/<row>.json; a row not measured has no file)
$PY bench/rows.py --from "$OUT" --results "${RESULTS:-bench/results}" 2>&1 | tee -a "$OUT/gpu.log"
# the suite on the CUDA machine with the time left (a cut-off run still shows how far it got)
if want pytest; then
    PYTEST_LEFT=$(( $(left) + 10 ))
    if ((PYTEST_LEFT >= ${PYTEST_MIN:-60})); then
        # plugins only where installed (a bare machine may lack pytest-xdist / pytest-timeout)
        PYTEST_ARGS=(-q -p no:cacheprovider)
        $PY -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n 12)
        $PY -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout 150)
        log "== pytest (limit ${PYTEST_LEFT}s): ${PYTEST_ARGS[*]}"
        DIFFALIGN_TEST_CUDA=1 timeout "$PYTEST_LEFT" $PY -m pytest "${PYTEST_ARGS[@]}" tests \
            >"$OUT/pytest.log" 2>&1
        log "pytest rc=$?"
        tail -40 "$OUT/pytest.log" >>"$OUT/gpu.log"
        grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
    else
        log "== pytest skipped: ${PYTEST_LEFT}s left of the call (run ONLY=pytest alone)"
    fi
fi
log "done"
