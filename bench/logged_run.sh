# Sourced by the bench scripts. run NAME SECONDS COMMAND... runs one measurement under a time limit: its whole output
# goes to $log/NAME.log, its last lines (warnings left out) to $log/NAME.txt and the screen; a failure is logged and
# the next measurement runs. Where nvidia-smi exists, the GPU's SM clock and power are sampled every half second
# meanwhile ($log/NAME.gpu.csv) and their medians end the log: a figure of a throttled GPU says so.
run() {
    local name=$1 seconds=$2 sampler=""; shift 2
    echo "== $name: $*"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 500 > "$log/$name.gpu.csv" &
        sampler=$!
    fi
    timeout "$seconds" "$@" > "$log/$name.log" 2>&1; echo "exit $?" >> "$log/$name.log"
    if [[ -n $sampler ]]; then
        kill "$sampler" 2> /dev/null; wait "$sampler" 2> /dev/null
        gpu_medians "$log/$name.gpu.csv" >> "$log/$name.log"
    fi
    grep -v "^W[0-9]\|Failed to load\|warn" "$log/$name.log" | tail -15 | tee "$log/$name.txt"
}

# gpu_medians FILE: one line with the medians of FILE's samples ("clock MHz, power W" a line).
gpu_medians() {
    python3 - "$1" << 'EOF'
import statistics, sys
rows = [line.split(",") for line in open(sys.argv[1]) if line.count(",") == 1]
samples = [(float(clock), float(power)) for clock, power in rows if clock.strip().replace(".", "").isdigit()]
if samples:
    clocks, powers = zip(*samples)
    print(f"GPU while it ran: SM clock median {statistics.median(clocks):.0f} MHz "
          f"(min {min(clocks):.0f}), power median {statistics.median(powers):.0f} W, {len(samples)} samples")
EOF
}
