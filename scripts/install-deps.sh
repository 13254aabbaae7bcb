#!/usr/bin/env bash
# Installs the system packages a make target needs, when they are missing.
#
#   scripts/install-deps.sh demo    what `make demo` links: the C clients the demo's modules bind to
#   scripts/install-deps.sh test    the above, plus the servers and tools the tests start or drive
#   scripts/install-deps.sh bench   the above, plus the load tools the benchmarks compare against
#   scripts/install-deps.sh --list PROFILE   prints the Debian packages of PROFILE, one a line
#
# Debian/Ubuntu: installs with apt-get (as root, or through sudo). Elsewhere it only reports
# what is missing. The demo profile must name every system library that `make demo` links:
# scripts/check-demo-deps.py (run by `make test`) compares it with the package manifest.
set -euo pipefail
profile="${1:-test}"
list_only=0
if [ "$profile" = "--list" ]; then list_only=1; profile="${2:-test}"; fi

# name of the check | Debian package | brew formula
demo_deps=(
  "pkg:pkg-config|pkg-config|pkg-config"
  "pc:hiredis|libhiredis-dev|hiredis"
  "pc:rdkafka|librdkafka-dev|librdkafka"
)
test_deps=(
  "bin:python3|python3|python3"
  "bin:script|util-linux|util-linux"
  "bin:redis-server|redis-server|redis"
  "bin:redis-cli|redis-tools|redis"
  "bin:kcat|kcat|kcat"
  "dir:/usr/lib/postgresql/*/bin/initdb|postgresql|postgresql"
  "bin:chromium|chromium|chromium"
)
bench_deps=(
  "bin:redis-benchmark|redis-tools|redis"
  "dir:/usr/lib/postgresql/*/bin/pgbench|postgresql|postgresql"
  "bin:wrk|wrk|wrk"
)

case "$profile" in
  demo) wanted=("${demo_deps[@]}") ;;
  test) wanted=("${demo_deps[@]}" "${test_deps[@]}") ;;
  bench) wanted=("${demo_deps[@]}" "${test_deps[@]}" "${bench_deps[@]}") ;;
  *) echo "usage: $0 demo|test|bench (or --list PROFILE)" >&2; exit 2 ;;
esac

if [ "$list_only" -eq 1 ]; then
  for entry in "${wanted[@]}"; do IFS='|' read -r _ deb _ <<<"$entry"; echo "$deb"; done | sort -u
  exit 0
fi

present() {
  local check="$1"
  case "$check" in
    pkg:*) command -v "${check#pkg:}" >/dev/null 2>&1 ;;
    pc:*) command -v pkg-config >/dev/null 2>&1 && pkg-config --exists "${check#pc:}" 2>/dev/null ;;
    bin:*) command -v "${check#bin:}" >/dev/null 2>&1 || [ -x "/usr/sbin/${check#bin:}" ] ;;
    dir:*) ls -d ${check#dir:} >/dev/null 2>&1 ;;
    *) return 1 ;;
  esac
}

missing=()
brew=()
for entry in "${wanted[@]}"; do
  IFS='|' read -r check deb formula <<<"$entry"
  if ! present "$check"; then
    missing+=("$deb")
    brew+=("$formula")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "installing (for make $profile): ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "missing system packages for make $profile: ${missing[*]} (brew: $(printf '%s\n' "${brew[@]}" | sort -u | tr '\n' ' '))" >&2
  exit 1
fi
