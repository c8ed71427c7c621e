#!/usr/bin/env bash
# Refresh a patch of a host crate from the edited copy in host/<crate>
# (quilt-style). A crate's patches apply in this order (see patches/README.md
# and `scripts/prepare-host.sh --series CRATE`): its KV-cache series
# patches/<crate>/, then its fixes series patches/fixes/<crate>/.
#
#   scripts/regen-patches.sh CRATE                  # refresh the top patch of
#                                                   # the KV-cache series
#   scripts/regen-patches.sh CRATE NNNN-topic       # refresh that patch of the
#                                                   # KV-cache series, or start it
#                                                   # as the series' new top patch
#   scripts/regen-patches.sh --fixes CRATE [NNNN-topic]
#                                                   # the same in the fixes series
#   scripts/regen-patches.sh CRATE patches/.../NNNN-topic.patch
#                                                   # refresh that patch
#
# Every difference between host/<crate> and pristine + all of its patches
# goes into the chosen patch: the new patch is the diff between pristine
# <crate>-<HOST_VERSION> with the patches below it applied, and host/<crate>
# with the patches above it reverse-applied (exactly, without fuzz). So the
# chosen patch need not be the last one applied: to change a KV-cache patch
# while the fixes sit on top of it, edit host/<crate> and name that patch.
# If an edit touches lines that a patch above changes or uses as context,
# reversing that patch fails and the script refuses (put the edit into that
# patch instead). Refresh patches one at a time. The patches above are then re-based (same changes, new line
# numbers) so that the series keeps applying without offsets or fuzz.
# Nothing is written unless pristine + the new series reproduces host/<crate>
# exactly.
#
# The description above the first `diff --git` line of a patch file is kept;
# a new patch gets a placeholder that must be replaced by a PR-style
# description.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
usage="usage: regen-patches.sh [--fixes] CRATE [NNNN-topic | PATCH-FILE]"
kind=kv
if [ "${1:-}" = "--fixes" ]; then kind=fixes; shift; fi
crate=${1:?$usage}
name=${2:-}
[ $# -le 2 ] || { echo "$usage" >&2; exit 2; }
die() { echo "regen-patches: $*" >&2; exit 1; }

HOST_VERSION=$(cat patches/HOST_VERSION)
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
archive=$(ls "$CARGO_HOME"/registry/cache/*/"$crate-$HOST_VERSION.crate" 2>/dev/null | head -n1 || true)
[ -n "$archive" ] || die "$crate-$HOST_VERSION.crate not in the cargo registry cache: run scripts/prepare-host.sh first"
[ -d "host/$crate" ] || die "host/$crate missing: run scripts/prepare-host.sh first"

# host/<crate> must have been prepared from exactly the current patch files,
# otherwise a patch that changed since (pull, checkout) would be reverted
# into the chosen patch. After editing only a description, running
# prepare-host.sh restamps host/<crate> without replacing it.
stamp=$(bash scripts/prepare-host.sh --stamp "$crate")
if [ "$(cat "host/$crate/.prepared" 2>/dev/null || true)" != "$stamp" ]; then
  die "host/$crate was not prepared from the current patch files of $crate, so its diff would be wrong.
  Save your edits to host/$crate elsewhere, run scripts/prepare-host.sh (it replaces host/$crate
  unless it already equals pristine + patches), re-apply the edits, then run this again."
fi

mapfile -t series < <(bash scripts/prepare-host.sh --series "$crate")
if [ "$kind" = kv ]; then dir="patches/$crate"; else dir="patches/fixes/$crate"; fi

# Pick the target patch and its position in the full series.
target="" new=""
if [ -z "$name" ]; then
  for p in "${series[@]}"; do
    [ "$(dirname "$p")" = "$dir" ] && target=$p
  done
  [ -n "$target" ] || die "no patches in $dir: give a name (NNNN-topic) for the first one"
elif [[ "$name" == */* ]]; then
  target=${name#./}
  [ -f "$target" ] || die "$target does not exist"
else
  target="$dir/${name%.patch}.patch"
  [ -f "$target" ] || new=1
fi
idx=-1
for i in "${!series[@]}"; do
  [ "${series[$i]}" = "$target" ] && idx=$i
done
if [ -n "$new" ]; then
  # A new patch goes on top of its series: after every existing patch of it.
  last=-1
  for i in "${!series[@]}"; do
    [ "$(dirname "${series[$i]}")" = "$dir" ] && last=$i
  done
  if [ "$last" -ge 0 ] && [[ "$(basename "$target")" < "$(basename "${series[$last]}")" ]]; then
    die "$target would not be the last patch of $dir (${series[$last]} sorts after it); name a new patch with a higher number"
  fi
  if [ "$last" -ge 0 ]; then
    idx=$((last + 1))
  elif [ "$kind" = kv ]; then
    idx=0
  else
    idx=${#series[@]}
  fi
  series=("${series[@]:0:$idx}" "$target" "${series[@]:$idx}")
elif [ "$idx" -lt 0 ]; then
  die "$target is not one of the patches of $crate ($(printf '%s ' "${series[@]}"))"
fi
below=("${series[@]:0:$idx}")
above=("${series[@]:$((idx + 1))}")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
extract() { mkdir -p "$tmp/x" && tar xzf "$archive" -C "$tmp/x" && mv "$tmp/x/$crate-$HOST_VERSION" "$1"; }
apply() { # apply DIR PATCH: exactly, no fuzz, no reject files
  patch -d "$1" -p1 --batch --forward --fuzz=0 --no-backup-if-mismatch -r - < "$2" > "$tmp/patch.log" 2>&1
}
unapply() { # reverse DIR PATCH: -f so that patch never guesses the direction
  patch -d "$1" -p1 -f -R --fuzz=0 --no-backup-if-mismatch -r - < "$2" > "$tmp/patch.log" 2>&1
}
diff_trees() { # the body of a patch from tree $1 to tree $2, as in the patch files
  (cd "$tmp" && rm -rf a b && cp -a "$1" a && cp -a "$2" b \
    && git diff --no-index --no-color --src-prefix=x/ --dst-prefix=x/ a b \
    | sed -e 's#^diff --git x/[ab]/\(.*\) x/b/\(.*\)$#diff --git a/\1 b/\2#' \
          -e 's#^--- x/a/#--- a/#' -e 's#^+++ x/b/#+++ b/#' || true)
}
header_of() { awk '/^diff --git /{exit} {print}' "$1"; }
mkdir -p "$tmp/out"
out() { echo "$tmp/out/$(echo "$1" | tr / %)"; }

# base: pristine + the patches below the target.
extract "$tmp/base"
for p in "${below[@]}"; do
  apply "$tmp/base" "$p" || die "$p does not apply cleanly (run scripts/prepare-host.sh to see why):
$(cat "$tmp/patch.log")"
done

# top: host/<crate> without the patches above the target, newest first.
mkdir "$tmp/top"
(cd "host/$crate" && tar cf - --exclude=./.prepared --exclude=./target .) | tar xf - -C "$tmp/top"
for ((i = ${#above[@]} - 1; i >= 0; i--)); do
  unapply "$tmp/top" "${above[$i]}" || die "cannot take ${above[$i]} off host/$crate: your edits touch lines that it changes or needs as context.
  Put those edits into that patch (scripts/regen-patches.sh $crate ${above[$i]}), or refresh the
  patches one at a time from the top. Nothing was written.
$(cat "$tmp/patch.log")"
done

body=$(diff_trees "$tmp/base" "$tmp/top")
[ -n "$body" ] || die "no changes for $target"
for p in "${below[@]}"; do cp "$p" "$(out "$p")"; done
if [ -z "$new" ]; then
  header_of "$target" > "$(out "$target")"
else
  printf 'Subject: %s\n\nTODO: describe this change as an upstream pull request.\n\n' \
    "$(basename "${target%.patch}")" > "$(out "$target")"
fi
printf '%s\n' "$body" >> "$(out "$target")"

# Re-base the patches above on the new target patch.
cp -a "$tmp/top" "$tmp/cur"
for p in "${above[@]}"; do
  cp -a "$tmp/cur" "$tmp/prev"
  apply "$tmp/cur" "$p" || die "internal error: $p does not re-apply:
$(cat "$tmp/patch.log")"
  header_of "$p" > "$(out "$p")"
  printf '%s\n' "$(diff_trees "$tmp/prev" "$tmp/cur")" >> "$(out "$p")"
  rm -rf "$tmp/prev"
done

# Check: pristine + the new series reproduces host/<crate>, without offsets.
extract "$tmp/check"
for p in "${series[@]}"; do
  apply "$tmp/check" "$(out "$p")" || die "internal error: the new $p does not apply; nothing was written:
$(cat "$tmp/patch.log")"
  if grep -q -e offset -e fuzz "$tmp/patch.log"; then
    die "internal error: the new $p applies only with offsets or fuzz; nothing was written"
  fi
done
(cd "host/$crate" && tar cf - --exclude=./.prepared --exclude=./target .) | (mkdir "$tmp/host" && tar xf - -C "$tmp/host")
if ! diff -rq "$tmp/check" "$tmp/host" > "$tmp/diff.log"; then
  die "internal error: pristine + the new series differs from host/$crate; nothing was written:
$(cat "$tmp/diff.log")"
fi

# Write the patch files that changed.
mkdir -p "$dir"
for p in "${series[@]}"; do
  o=$(out "$p")
  if ! cmp -s "$o" "$p"; then
    cp "$o" "$p"
    echo "regen-patches: wrote $p"
  fi
done
# The prepared copy now equals pristine + patches: record that so that
# prepare-host.sh leaves it (and its build cache) alone.
bash scripts/prepare-host.sh --restamp "$crate" >/dev/null
