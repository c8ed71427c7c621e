#!/usr/bin/env bash
# Extract the pristine host crates (pinned in host-pin/Cargo.toml) from the
# local cargo registry cache into ./host/<crate>, and apply
# patches/<crate>/NNNN-*.patch in order. Idempotent: a crate whose patch set
# has not changed since the last run is left alone (so its build stays cached).
# Any patch that does not apply fails the script.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
HOST_VERSION=$(cat patches/HOST_VERSION)
CRATES=(mistralrs-core mistralrs-cli mistralrs-server-core mistralrs)
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}

cargo fetch --manifest-path host-pin/Cargo.toml --locked -q 2>/dev/null \
  || cargo fetch --manifest-path host-pin/Cargo.toml -q

# `--restamp CRATE`: mark host/CRATE as matching the current patch files
# without touching its sources (used by regen-patches.sh, keeps builds cached).
restamp=""
if [ "${1:-}" = "--restamp" ]; then restamp=${2:?--restamp needs a crate}; fi

mkdir -p host
for crate in "${CRATES[@]}"; do
  if [ -n "$restamp" ] && [ "$crate" != "$restamp" ]; then continue; fi
  archive=$(ls "$CARGO_HOME"/registry/cache/*/"$crate-$HOST_VERSION.crate" 2>/dev/null | head -n1 || true)
  if [ -z "$archive" ]; then
    echo "prepare-host: $crate-$HOST_VERSION.crate not found in the cargo registry cache after 'cargo fetch'" >&2
    exit 1
  fi
  patches=()
  if [ -d "patches/$crate" ]; then
    while IFS= read -r p; do patches+=("$p"); done < <(ls "patches/$crate"/*.patch 2>/dev/null | sort)
  fi
  stamp=$( { echo "$HOST_VERSION"; sha256sum "$archive" | cut -d' ' -f1; for p in "${patches[@]}"; do sha256sum "$p"; done; } | sha256sum | cut -d' ' -f1)
  dest="host/$crate"
  if [ -n "$restamp" ]; then
    echo "$stamp" > "$dest/.prepared"
    continue
  fi
  if [ -f "$dest/.prepared" ] && [ "$(cat "$dest/.prepared")" = "$stamp" ]; then
    echo "prepare-host: $crate up to date (${#patches[@]} patches)"
    continue
  fi
  tmp=$(mktemp -d host/.tmp.XXXXXX)
  tar xzf "$archive" -C "$tmp"
  for p in "${patches[@]}"; do
    if ! patch -d "$tmp/$crate-$HOST_VERSION" -p1 --forward --batch --quiet -r - < "$p"; then
      echo "prepare-host: $p does not apply to pristine $crate $HOST_VERSION." >&2
      echo "  Regenerate it against the pinned version (scripts/regen-patches.sh) or fix patches/HOST_VERSION." >&2
      rm -rf "$tmp"
      exit 1
    fi
  done
  rm -rf "$dest"
  mv "$tmp/$crate-$HOST_VERSION" "$dest"
  rm -rf "$tmp"
  echo "$stamp" > "$dest/.prepared"
  echo "prepare-host: $crate $HOST_VERSION prepared with ${#patches[@]} patches"
done
