#!/usr/bin/env bash
# Session 21, third try (device time short): the 8 GiB plan's peak with the corrected saved draws, stock and op.
# The first call (FIRST=1) runs `python -m bench.dropout_check`, then starts the detached bench; later calls collect it.
ROWS=('=engine QLoRA full, 8 GiB, free-running' '=explore: engine QLoRA full, 8 GiB, free-running, dropout mask op')
if [ -n "${FIRST:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/proj/*.whl > /dev/null 2>&1
    (cd .whl/proj && md5sum -- *.whl | md5sum) > /tmp/site/.wheels
    PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 timeout 230 python3 -m bench.dropout_check > "$OUT/dropout_check.json" \
        2> "$OUT/dropout_check.err"
    echo "check rc=$?"; tail -c 2500 "$OUT/dropout_check.json"; grep -E "Error|error" "$OUT/dropout_check.err" | tail -5
fi
CALL_LIMIT=${CALL_LIMIT:-590} DETACH=280 bash bench/device_call.sh --set free explore --repeats 1 --no-check \
    --row-timeout 200 --rows "${ROWS[@]}"
