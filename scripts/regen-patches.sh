#!/usr/bin/env bash
# Refresh the top patch of a host crate from the edited copy in host/<crate>
# (quilt-style: edits always go into the newest patch of the series).
#
#   scripts/regen-patches.sh mistralrs-core            # refresh the top patch
#   scripts/regen-patches.sh mistralrs-core 0003-topic # start a new top patch
#
# The diff is taken against pristine <crate>-<HOST_VERSION> with every patch
# below the top one applied. The description above the first `diff --git`
# line of the patch file is kept; a new patch gets a placeholder that must be
# replaced by a PR-style description.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
crate=${1:?usage: regen-patches.sh CRATE [NNNN-new-topic]}
new=${2:-}
HOST_VERSION=$(cat patches/HOST_VERSION)
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
archive=$(ls "$CARGO_HOME"/registry/cache/*/"$crate-$HOST_VERSION.crate" | head -n1)
[ -d "host/$crate" ] || { echo "host/$crate missing: run scripts/prepare-host.sh first" >&2; exit 1; }

mkdir -p "patches/$crate"
mapfile -t series < <(ls "patches/$crate"/*.patch 2>/dev/null | sort)
if [ -n "$new" ]; then
  top="patches/$crate/${new%.patch}.patch"
  [ -e "$top" ] && { echo "$top exists" >&2; exit 1; }
  below=("${series[@]}")
else
  [ ${#series[@]} -gt 0 ] || { echo "no patches for $crate: give a name for the first one" >&2; exit 1; }
  top=${series[-1]}
  below=("${series[@]:0:${#series[@]}-1}")
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar xzf "$archive" -C "$tmp"
mv "$tmp/$crate-$HOST_VERSION" "$tmp/a"
for p in "${below[@]}"; do patch -d "$tmp/a" -p1 --batch --quiet < "$p"; done
mkdir "$tmp/b"
(cd "host/$crate" && tar cf - --exclude=./.prepared --exclude=./target .) | tar xf - -C "$tmp/b"

if [ -f "$top" ] && [ -z "$new" ]; then
  header=$(awk '/^diff --git /{exit} {print}' "$top")
else
  header="$(printf 'Subject: %s\n\nTODO: describe this change as an upstream pull request.\n' "$new")"
fi
body=$(cd "$tmp" && git diff --no-index --no-color --src-prefix=x/ --dst-prefix=x/ a b \
  | sed -e 's#^diff --git x/[ab]/\(.*\) x/b/\(.*\)$#diff --git a/\1 b/\2#' \
        -e 's#^--- x/a/#--- a/#' -e 's#^+++ x/b/#+++ b/#' || true)
if [ -z "$body" ]; then
  echo "regen-patches: no changes for the top patch of $crate" >&2
  exit 1
fi
printf '%s\n%s\n' "$header" "$body" > "$top"
echo "regen-patches: wrote $top"
# The prepared copy now equals pristine + patches: record that so that
# prepare-host.sh leaves it (and its build cache) alone.
scripts/prepare-host.sh --restamp "$crate" >/dev/null
