#!/usr/bin/env bash
# Extract the pristine host crates (pinned in host-pin/Cargo.toml) from the
# local cargo registry cache into ./host/<crate>, and apply the patch series
# of each crate in order (see patches/README.md):
#   1. patches/<crate>/NNNN-*.patch        the KV-cache backend series
#   2. patches/fixes/<crate>/NNNN-*.patch  host fixes unrelated to KV caches
# Idempotent: a crate whose patch set has not changed since the last run is
# left alone (so its build stays cached). Any patch that does not apply fails
# the script.
#
# A crate whose patch set changed but whose prepared copy already equals
# pristine + patches (e.g. after patches were split or their descriptions
# edited) is only restamped, not replaced, so it is not recompiled either.
#
#   scripts/prepare-host.sh                  # prepare every crate
#   scripts/prepare-host.sh --series CRATE   # print CRATE's patches in order
#   scripts/prepare-host.sh --stamp CRATE    # print the stamp of CRATE's patch set
#   scripts/prepare-host.sh --restamp CRATE  # see below
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
HOST_VERSION=$(cat patches/HOST_VERSION)
CRATES=(mistralrs-core mistralrs-cli mistralrs-server-core mistralrs mistralrs-quant)
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}

# The patches of a crate in application order: its KV-cache series, then its
# fixes series, each sorted by name.
series() {
  local dir
  for dir in "patches/$1" "patches/fixes/$1"; do
    if [ -d "$dir" ]; then
      ls "$dir"/*.patch 2>/dev/null | sort || true
    fi
  done
}

if [ "${1:-}" = "--series" ]; then
  series "${2:?--series needs a crate}"
  exit 0
fi

cargo fetch --manifest-path host-pin/Cargo.toml --locked -q 2>/dev/null \
  || cargo fetch --manifest-path host-pin/Cargo.toml -q

# `--restamp CRATE`: mark host/CRATE as matching the current patch files
# without touching its sources (used by regen-patches.sh, keeps builds cached).
# `--stamp CRATE`: print the stamp host/CRATE/.prepared has when it was
# prepared from the current patch files (used by regen-patches.sh).
mode="" only=""
case "${1:-}" in
  --restamp | --stamp) mode=$1; only=${2:?$1 needs a crate} ;;
  "") ;;
  *) echo "usage: prepare-host.sh [--series|--stamp|--restamp CRATE]" >&2; exit 2 ;;
esac

mkdir -p host
for crate in "${CRATES[@]}"; do
  if [ -n "$only" ] && [ "$crate" != "$only" ]; then continue; fi
  archive=$(ls "$CARGO_HOME"/registry/cache/*/"$crate-$HOST_VERSION.crate" 2>/dev/null | head -n1 || true)
  if [ -z "$archive" ]; then
    echo "prepare-host: $crate-$HOST_VERSION.crate not found in the cargo registry cache after 'cargo fetch'" >&2
    exit 1
  fi
  patches=()
  while IFS= read -r p; do patches+=("$p"); done < <(series "$crate")
  nfixes=0
  for p in "${patches[@]}"; do
    case "$p" in patches/fixes/*) nfixes=$((nfixes + 1)) ;; esac
  done
  counts="${#patches[@]} patches ($((${#patches[@]} - nfixes)) KV-cache, $nfixes fixes)"
  # Patch paths are part of the stamp: moving a patch between series re-prepares.
  stamp=$( { echo "$HOST_VERSION"; sha256sum "$archive" | cut -d' ' -f1; for p in "${patches[@]}"; do sha256sum "$p"; done; } | sha256sum | cut -d' ' -f1)
  dest="host/$crate"
  if [ "$mode" = "--stamp" ]; then
    echo "$stamp"
    continue
  fi
  if [ "$mode" = "--restamp" ]; then
    echo "$stamp" > "$dest/.prepared"
    continue
  fi
  if [ -f "$dest/.prepared" ] && [ "$(cat "$dest/.prepared")" = "$stamp" ]; then
    echo "prepare-host: $crate up to date: $counts"
    continue
  fi
  tmp=$(mktemp -d host/.tmp.XXXXXX)
  tar xzf "$archive" -C "$tmp"
  for p in "${patches[@]}"; do
    if ! patch -d "$tmp/$crate-$HOST_VERSION" -p1 --forward --batch --quiet -r - < "$p"; then
      echo "prepare-host: $p does not apply to pristine $crate $HOST_VERSION with the patches before it." >&2
      echo "  Regenerate it against the pinned version (scripts/regen-patches.sh) or fix patches/HOST_VERSION." >&2
      rm -rf "$tmp"
      exit 1
    fi
  done
  if [ -d "$dest" ] && diff -rq -x .prepared -x target "$tmp/$crate-$HOST_VERSION" "$dest" >/dev/null 2>&1; then
    rm -rf "$tmp"
    echo "$stamp" > "$dest/.prepared"
    echo "prepare-host: $crate $HOST_VERSION already equals pristine + its $counts; restamped, sources kept"
    continue
  fi
  rm -rf "$dest"
  mv "$tmp/$crate-$HOST_VERSION" "$dest"
  rm -rf "$tmp"
  echo "$stamp" > "$dest/.prepared"
  echo "prepare-host: $crate $HOST_VERSION prepared with $counts"
done
