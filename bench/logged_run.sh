# Sourced by the bench scripts. run NAME SECONDS COMMAND... runs one measurement under a time limit: its whole output
# goes to $log/NAME.log, its last lines (warnings left out) to $log/NAME.txt and the screen; a failure is logged and
# the next measurement runs.
run() {
    local name=$1 seconds=$2; shift 2
    echo "== $name: $*"
    timeout "$seconds" "$@" > "$log/$name.log" 2>&1; echo "exit $?" >> "$log/$name.log"
    grep -v "^W[0-9]\|Failed to load\|warn" "$log/$name.log" | tail -14 | tee "$log/$name.txt"
}
