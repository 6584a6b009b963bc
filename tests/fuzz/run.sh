#!/usr/bin/env bash
# Run every fuzz target for RUNS executions (default 1,000,000), two at a time, growing
# the committed corpora in tests/fuzz/corpus/ (minimized afterwards). Needs cargo-fuzz;
# stable Rust runs it with RUSTC_BOOTSTRAP=1 and no sanitizer (`-s none`).
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-1000000}
TARGETS=${TARGETS:-"requests admin pii output_filter tokenizer chat_template"}
export RUSTC_BOOTSTRAP=1
export WARDEN_MODELS_DIR=${WARDEN_MODELS_DIR:-$(cd ../.. && pwd)/models}
cargo fuzz build -s none -O
mkdir -p logs
run() {
    local t=$1
    mkdir -p "corpus/$t"
    cargo fuzz run -s none -O "$t" "corpus/$t" "seeds/$t" -- \
        -runs="$RUNS" -max_len=4096 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
        >"logs/$t.log" 2>&1 || { echo "FAIL: $t (tests/fuzz/logs/$t.log)"; tail -n 40 "logs/$t.log"; return 1; }
    local execs secs
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$')
    secs=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$')
    echo "$t: $execs executions, $secs per second, no crash"
}
status=0
set -- $TARGETS
while [ $# -gt 0 ]; do
    run "$1" & a=$!
    b=
    if [ $# -gt 1 ]; then run "$2" & b=$!; fi
    wait $a || status=1
    if [ -n "$b" ]; then wait $b || status=1; fi
    shift; [ $# -gt 0 ] && shift
done
for t in $TARGETS; do
    cargo fuzz cmin -s none -O "$t" "corpus/$t" -- -max_len=4096 >/dev/null 2>&1 || true
done
exit $status
