#!/usr/bin/env bash
# Installs the system packages the tests and benchmarks need, when they are missing.
# Debian/Ubuntu: libhiredis-dev (the C client the Redis module binds to) and redis-server
# (the tests start their own throwaway server from it). Elsewhere it only reports what is missing.
set -euo pipefail
missing=()
pkg-config --exists hiredis 2>/dev/null || missing+=(libhiredis-dev)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "missing system packages: ${missing[*]} (install them with your package manager; brew: hiredis redis)" >&2
  exit 1
fi
