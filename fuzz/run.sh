#!/usr/bin/env bash
# Coverage-guided fuzzing of the protocol decoders and the ring consumer on stable Rust: libFuzzer with
# SanitizerCoverage instrumentation (what cargo-fuzz enables, minus the nightly-only ASan).
# Usage: fuzz/run.sh [TARGET...] [-- SECONDS]   (default: all targets, 20 s each)
set -euo pipefail
cd "$(dirname "$0")"
secs=20
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) secs="$2"; shift 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(request_decoder reply_decoder wire_decoder ring_consumer)
triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# --target keeps build scripts uninstrumented.
cargo build --release --target "$triple" --target-dir target
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "fuzzing $t for ${secs}s"
  "./target/$triple/release/$t" "corpus/$t" -max_total_time="$secs" \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>&1 | tail -n 12
done
