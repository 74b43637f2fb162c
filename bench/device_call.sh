#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool's `run`), from the repository root there:
#
#   bash bench/device_call.sh [train_speed arguments...]
#
# e.g. bash bench/device_call.sh --set explore --rows compiled --repeats 1 --time-budget 480
#
# With CALL_LIMIT=<seconds> (the call's timeout_s) the call is one of a series on a warm machine: rows already
# measured by an earlier call there (their JSON kept in /tmp/phi3_lora_bench/calls) are not run again, and a row
# starts only if its expected time fits before the limit, so the same command, sent again, goes on where the
# last one stopped: e.g. CALL_LIMIT=590 bash bench/device_call.sh --set main --repeats 2 --no-check
#
# With DETACH=<seconds> the bench runs as its own process session (setsid), which outlives the call and begins no
# run it does not expect to end within DETACH seconds of the first call's start: no device time is lost to the end
# of a call that no run fitted, nor between calls. Every call with the same command starts it (the first) or follows
# it, sends back its files so far, and returns when the bench ends or at CALL_LIMIT (default 590): send it again
# within the machine's warm time (30 s). The bench runs from its own copy of the tree (a call refreshes this one).
# DETACH_RESTART=1 stops a bench started earlier and starts this one (the model and caches under /tmp stay).
# e.g. DETACH=1600 CALL_LIMIT=590 bash bench/device_call.sh --set main --repeats 2 --no-check
#
# Needs the wheels carried in .whl/ (carry=[".whl"]): .whl/proj (this project's pins that the machine's image
# lacks: trl, peft, bitsandbytes, liger-kernel, datasets, gguf, ...) and .whl/uns (Unsloth and its pins, only for
# Unsloth rows). Installs each into its own folder under /tmp (nothing can be downloaded there), then runs
# bench/train_speed.py with its JSON, log and the docs table under $OUT. Run with `bash`, so the file needs no
# executable bit (issue 19's first session lost a call to that). BENCH_ROOT (default /tmp/phi3_lora_bench: model,
# data, the calls' JSON, the detached bench) and BENCH_MODULE (default bench.train_speed) are for the tests.
set -uo pipefail
START=$(date +%s)
OUT=${OUT:-/tmp/out}
ROOT=${BENCH_ROOT:-/tmp/phi3_lora_bench}
BENCH=${BENCH_MODULE:-bench.train_speed}
mkdir -p "$OUT" "$ROOT"
CALLS=$ROOT/calls
if [ -n "${DETACH:-}" ]; then
    RUN=$ROOT/detached
    if [ -n "${DETACH_RESTART:-}" ] && [ -f "$RUN/pid" ]; then  # stop the bench (its process group) and start anew
        kill -- "-$(cat "$RUN/pid")" 2>/dev/null; sleep 2; rm -rf "$RUN"
    fi
    if [ ! -d "$RUN" ]; then
        mkdir -p "$RUN/out" && cp -a . "$RUN/repo" || exit 1
        DEADLINE=$((START + DETACH))  # before the line below, whose DETACH='' a $((...)) there would read
        # Redirected around the whole list: the subshell that runs a backgrounded list keeps the call's own output
        # open until the list ends, so whoever reads the call's output to its end would wait for the whole bench.
        (cd "$RUN/repo" && OUT="$RUN/out" DETACH='' CALL_LIMIT='' RUN_DEADLINE=$DEADLINE \
            setsid bash -c 'echo $$ > "$0/pid"; exec bash bench/device_call.sh "$@"' "$RUN" "$@" &) \
            > "$RUN/log.txt" 2>&1 < /dev/null
        until [ -f "$RUN/pid" ]; do sleep 0.2; done
    fi
    PID=$(cat "$RUN/pid")
    until ! kill -0 "$PID" 2>/dev/null || [ "$(date +%s)" -ge $((START + ${CALL_LIMIT:-590} - 10)) ]; do
        sleep 5
        cp -a "$RUN/out/." "$OUT/" 2>/dev/null
    done
    cp -a "$RUN/out/." "$OUT/" 2>/dev/null
    cp "$RUN/log.txt" "$OUT/detached-log.txt"
    grep -E '^\{"name"|time budget|runs done|Error|error' "$RUN/log.txt" | tail -n 60
    if kill -0 "$PID" 2>/dev/null; then echo "bench still running: send the same command again"; else echo "bench ended"; fi
    exit 0
fi
SERIES=()
if [ -n "${RUN_DEADLINE:-}" ]; then  # a detached bench (DETACH above): 10 s kept for the tables
    SERIES=(--deadline-epoch "$((RUN_DEADLINE - 10))")
elif [ -n "${CALL_LIMIT:-}" ]; then  # 15 s kept for writing the tables and sending $OUT back
    mkdir -p "$CALLS"
    SERIES=(--done-dir "$CALLS" --deadline-epoch "$((START + CALL_LIMIT - 15))")
fi
pip_target() {  # wheel folder, target folder; skipped when a warm machine already has these very wheels there
    [ -d "$1" ] || return 0
    local have; have=$(cd "$1" && md5sum -- *.whl | md5sum)
    [ -f "$2/.wheels" ] && [ "$(cat "$2/.wheels")" = "$have" ] && return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl \
        && echo "$have" > "$2/.wheels"
}
pip_target .whl/proj /tmp/site || exit 1
pip_target .whl/uns /tmp/uns || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
[ -d /tmp/uns ] && export PEER_PYTHONPATH=/tmp/uns
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"
cp docs/benchmarks.md "$ROOT/benchmarks.md"
# The tokenizer folder carried in .whl/ (carry_wheels.sh makes it), else one made once per machine under /tmp.
TOKENIZER=.whl/phi3_tokenizer
[ -f "$TOKENIZER/tokenizer_config.json" ] || TOKENIZER=$ROOT/phi3_tokenizer
python3 -m "$BENCH" --workdir "$ROOT" --tokenizer "$TOKENIZER" --json "$OUT/result.json" \
    --markdown "$ROOT/benchmarks.md" "${SERIES[@]}" "$@" 2>&1 | tee "$OUT/log.txt" | grep -v -i -E "warn|Loading weights|it/s\]" 
rc=${PIPESTATUS[0]}
[ -n "${CALL_LIMIT:-}" ] && [ -f "$OUT/result.json" ] && cp "$OUT/result.json" "$CALLS/call-$START.json"
cp "$ROOT/benchmarks.md" "$OUT/benchmarks.md"
exit "$rc"
