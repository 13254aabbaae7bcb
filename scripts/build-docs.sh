#!/usr/bin/env bash
# Builds the DocC catalog of every library product with the docc that ships with the toolchain
# (through swift-docc-plugin), treating warnings (broken symbol links, missing articles) as errors.
set -euo pipefail
cd "$(dirname "$0")/.."
out=".build/docs"
mkdir -p "$out"
for target in ExactlyOnce ExactlyOnceTestKit ExactlyOnceFileStore ExactlyOnceRedis ExactlyOnceKafka; do
  echo "documentation: $target"
  swift package --allow-writing-to-directory "$out" generate-documentation \
    --target "$target" --warnings-as-errors --output-path "$out/$target" >"$out/$target.log" 2>&1 || {
    cat "$out/$target.log" >&2
    echo "documentation of $target failed (log above)" >&2
    exit 1
  }
done
# Products behind a package trait build their documentation with the trait on.
for entry in "ExactlyOncePostgres:Postgres"; do
  target="${entry%%:*}"
  trait="${entry#*:}"
  echo "documentation: $target (trait $trait)"
  swift package --traits "$trait" --allow-writing-to-directory "$out" generate-documentation \
    --target "$target" --warnings-as-errors --output-path "$out/$target" >"$out/$target.log" 2>&1 || {
    cat "$out/$target.log" >&2
    echo "documentation of $target failed (log above)" >&2
    exit 1
  }
done
echo "documentation built in $out"
