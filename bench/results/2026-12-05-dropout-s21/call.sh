#!/usr/bin/env bash
# Session 21 device calls: the dropout mask op and the saved seeds, on the H200. `bash call.sh [1|2|3]`:
#   1 (run, 783 s): the op and stock at each budget, no LoRA dropout, the recipe and Unsloth's whole-GPU row;
#   2 (refused: no machine): the corrected saved draws (attention not marked) and the op keyed per layer, at each
#     budget (full rows);
#   3 (refused): the 8 GiB plan's peak alone, once each (for when device time is short).
# The first call of a series (FIRST=1) runs `python -m bench.dropout_check`, then starts the detached bench;
# later calls with the same argument collect it.
full=('=engine QLoRA full, 8 GiB, free-running' '=explore: engine QLoRA full, 8 GiB, free-running, dropout mask op')
twenty_four=('=engine QLoRA full, 24 GiB, free-running' '=explore: engine QLoRA full, 24 GiB, free-running, dropout mask op')
whole=('=engine QLoRA full, whole GPU, free-running' '=explore: engine QLoRA full, whole GPU, free-running, dropout mask op')
case "${1:-1}" in
    1) ROWS=("${whole[@]}" '=explore: engine QLoRA full, whole GPU, free-running, no LoRA dropout'
             '=engine QLoRA mix, whole GPU, free-running' '=explore: engine QLoRA mix, whole GPU, free-running, dropout mask op'
             "${full[@]}" "${twenty_four[@]}" '=recipe QLoRA full rows, free-running'
             '=unsloth QLoRA full, whole GPU, free-running')
       DETACH=1250 REPEATS=2 ;;
    2) ROWS=("${full[@]}" "${twenty_four[@]}"); DETACH=400 REPEATS=2 ;;
    3) ROWS=("${full[@]}"); DETACH=280 REPEATS=1 ;;
    *) echo "usage: bash call.sh [1|2|3]"; exit 2 ;;
esac
if [ -n "${FIRST:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/proj/*.whl > /dev/null 2>&1
    (cd .whl/proj && md5sum -- *.whl | md5sum) > /tmp/site/.wheels
    PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 timeout 230 python3 -m bench.dropout_check > "$OUT/dropout_check.json" \
        2> "$OUT/dropout_check.err"
    echo "check rc=$?"; tail -c 2500 "$OUT/dropout_check.json"; grep -E "Error|error" "$OUT/dropout_check.err" | tail -5
fi
CALL_LIMIT=${CALL_LIMIT:-590} DETACH=$DETACH bash bench/device_call.sh --set free explore --repeats "$REPEATS" --no-check \
    --row-timeout 200 --rows "${ROWS[@]}"
