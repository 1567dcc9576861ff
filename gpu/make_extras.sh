#!/usr/bin/env bash
# Build bt-ray's extra wheel set (gpu/extras.txt) for the air-gapped GPU node, in parts of at most
# --parts-mib MiB with a MANIFEST, in the layout gpu/install_wheelset.sh reads.
#
# usage: make_extras.sh OUTDIR [--parts-mib 60]
#
# Wheels for cp312 manylinux x86_64 are downloaded as published (--no-deps, versions pinned in
# extras.txt, sha256 recorded in MANIFEST). DeepSpeed publishes only a source archive: it is built
# here into a pure-Python wheel with DS_BUILD_OPS=0 (no CUDA ops; bt-ray passes torch's AdamW, so
# none are needed), which needs torch and setuptools >= 70.1 (or `wheel`) in the Python that builds it:
# the repo's .venv (scripts/install.sh) when there is one, else python3; PYTHON=... picks another.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV_PY="$HERE/../.venv/bin/python"
PY=${PYTHON:-$([ -x "$VENV_PY" ] && echo "$VENV_PY" || echo python3)}
die() { echo "make_extras: error: $*" >&2; exit 1; }
OUTDIR="" PARTS_MIB=60
while [ $# -gt 0 ]; do
  case "$1" in
    --parts-mib) PARTS_MIB=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) OUTDIR=$1; shift ;;
  esac
done
[ -n "$OUTDIR" ] || die "usage: make_extras.sh OUTDIR [--parts-mib 60]"
# DeepSpeed's build needs both; checked before any download
"$PY" -c "import torch" 2>/dev/null ||
  die "$PY has no torch (DeepSpeed's build imports it): run scripts/install.sh (makes .venv) or set PYTHON="
"$PY" -c "import setuptools.command.bdist_wheel" 2>/dev/null || "$PY" -c "import wheel" 2>/dev/null ||
  die "$PY cannot build wheels (setuptools < 70.1 and no wheel package): $PY -m pip install wheel, or set PYTHON="
WORK=$(mktemp -d "${TMPDIR:-/tmp}/extras-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/dl" "$OUTDIR"

grep -v '^#' "$HERE/extras.txt" | awk 'NF {print $1}' | grep -v '^deepspeed==' >"$WORK/binary.txt"
DS=$(grep -v '^#' "$HERE/extras.txt" | awk '$1 ~ /^deepspeed==/ {print $1}')
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)
PLAT_ARGS=(); for p in "${PLATFORMS[@]}"; do PLAT_ARGS+=(--platform "$p"); done
echo "downloading $(wc -l <"$WORK/binary.txt") wheels ..."
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLAT_ARGS[@]}" --progress-bar off -q -d "$WORK/dl" -r "$WORK/binary.txt"
echo "building $DS (DS_BUILD_OPS=0) ..."
"$PY" -m pip download --no-deps --no-binary=:all: --progress-bar off -q -d "$WORK/src" "$DS"
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -q -w "$WORK/dl" "$WORK"/src/deepspeed-*.tar.gz
ls "$WORK"/dl/deepspeed-*.whl >/dev/null || die "the DeepSpeed wheel was not built"

# Split wheels above the part size, pack parts (biggest first), write MANIFEST (sha256 of wheels and pieces).
CAP=$((PARTS_MIB * 1024 * 1024 - 64 * 1024))
rm -rf "$OUTDIR"/part[0-9]* "$OUTDIR/MANIFEST"
mkdir -p "$WORK/items"
(cd "$WORK/dl" && sha256sum -- *.whl) >"$WORK/MANIFEST"
for f in "$WORK"/dl/*.whl; do
  b=$(basename "$f")
  if [ "$(stat -c %s "$f")" -le "$CAP" ]; then mv "$f" "$WORK/items/$b"
  else
    split -b "$CAP" -d -a 3 -- "$f" "$WORK/items/$b.split-"
    (cd "$WORK/items" && sha256sum -- "$b".split-*) >>"$WORK/MANIFEST"
  fi
done
"$PY" - "$WORK/items" "$OUTDIR" "$CAP" <<'PY'
import os, shutil, sys
items, out, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
bins = []
for size, name in sorted(((os.path.getsize(os.path.join(items, f)), f) for f in os.listdir(items)), reverse=True):
    for b in bins:
        if b[0] + size <= cap:
            b[0] += size; b[1].append(name); break
    else:
        bins.append([size, [name]])
for i, (_, names) in enumerate(bins, 1):
    os.makedirs(os.path.join(out, f"part{i}"))
    for n in names:
        shutil.move(os.path.join(items, n), os.path.join(out, f"part{i}", n))
PY
cp "$WORK/MANIFEST" "$OUTDIR/MANIFEST"
for d in "$OUTDIR"/part[0-9]*; do cp "$WORK/MANIFEST" "$d/MANIFEST"; done
du -sh "$OUTDIR"/part[0-9]* | sed 's/^/  /'
echo "extras: $(grep -c '\.whl$' "$OUTDIR/MANIFEST") wheels -> $OUTDIR"
