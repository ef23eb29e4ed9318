#!/usr/bin/env bash
# The flakiness check of `make test-repeat`: ROUNDS rounds of the main suite run twice at once
# (separate temporary directories, so nothing is shared but the machine), beside a process
# that keeps one core busy, as a loaded CI machine would. Prints every test that failed in any
# run, with the round and copy, and exits 1 if one did.
set -u
cd "$(dirname "$0")/.."
rounds=${1:-2}
out=runs/test-repeat
rm -rf "$out"; mkdir -p "$out"
py=.venv/bin/python
"$py" -c "import time
t = time.time()
while time.time() - t < 4 * 3600: pass" &
hog=$!
trap 'kill $hog 2>/dev/null' EXIT
failed=0
declare -A pids
for r in $(seq 1 "$rounds"); do
  for c in a b; do
    TMPDIR=$(mktemp -d) "$py" -m pytest -q -p no:cacheprovider tests -m "not multidevice" \
      -o junit_family=xunit2 --junitxml="$out/round$r-$c.xml" > "$out/round$r-$c.log" 2>&1 &
    pids[$c]=$!
  done
  for c in a b; do
    wait "${pids[$c]}" || failed=1
    echo "round $r copy $c: $(tail -1 "$out/round$r-$c.log")"
  done
done
grep -h "^FAILED\|^ERROR" "$out"/*.log | sort | uniq -c | sort -rn
exit $failed
