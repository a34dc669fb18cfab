#!/usr/bin/env bash
# Unpack the Debian documentation packages of the long-context training recipe (zeroc/train/recipe.py,
# docs/data.md) into one directory, without installing them: apt-get download + dpkg -x.
# Usage: tools/fetch_train_corpus.sh [DIR]   (default /tmp/zeroc-corpus)
set -euo pipefail
dir=$(realpath -m "${1:-/tmp/zeroc-corpus}")
mkdir -p "$dir/debs"
cd "$dir/debs"
for pkg in python3.11-doc sphinx-doc git-doc developers-reference python-requests-doc; do
  ls "${pkg}"_*.deb >/dev/null 2>&1 || apt-get download "$pkg"
  dpkg -x "${pkg}"_*.deb "$dir"
done
# keep only the text sources (about 17 MB): small enough to carry to a device machine
find "$dir/usr" -type f ! -name '*.txt' ! -name '*.rst' -delete
echo "corpus unpacked under $dir (main: $dir/usr/share/doc/python3.11/html/_sources)"
