#!/bin/bash
# Issue 23's RELION-5 beside ours, step 1 of 3, on this (networked) machine: gather what the device needs to build
# RELION 5 with CUDA, since nothing can be fetched there. Writes .relion5/ in the repository root (ignored; carry it):
#   relion-<commit>.tar.gz    a source snapshot of RELION (git archive of a 3dem/relion clone, e.g. the fetch tool's
#                             github:3dem/relion mirror); no RELION code enters this repository
#   libtiff-<tag>.tar.gz      libtiff's source (RELION requires TIFF; the device image has no headers for it)
#   fftw.tar.gz               FFTW 3.3.10 headers and static libraries from Debian's libfftw3-dev, each precision's
#                             thread library merged into it (RELION calls fftw_init_threads but links only -lfftw3[f])
#   mpich.tar.gz              MPICH from PyPI's manylinux wheel (RELION's CMake requires MPI; mpicxx is relocatable),
#                             without its second (ABI) library
# About 14 MB in all: the carry limit is 64 MiB with the working tree.
#   SOURCES.txt               where each came from, with sha256
# usage: bash bench/relion5/prepare.sh RELION_GIT_DIR LIBTIFF_GIT_DIR [RELION_REV] [LIBTIFF_REV]
#   e.g. bash bench/relion5/prepare.sh /work/.mirror/3dem+relion/repo /work/.mirror/libsdl-org+libtiff/repo
# Then on the device (carry .relion5): bash bench/relion5/build.sh, and bench/paper_bench.py's relion5 action.
set -euo pipefail
relion_git=${1:?usage: prepare.sh RELION_GIT_DIR LIBTIFF_GIT_DIR [RELION_REV] [LIBTIFF_REV]}
tiff_git=${2:?LIBTIFF_GIT_DIR}
relion_rev=${3:-HEAD}
tiff_rev=${4:-v4.7.1}
MPICH=5.0.2
root=$(git rev-parse --show-toplevel)
dest=$root/.relion5
grep -qx '/.relion5/' "$root/.gitignore" || { echo "add /.relion5/ to .gitignore first" >&2; exit 2; }
rm -rf "$dest" && mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

commit=$(git -C "$relion_git" rev-parse "$relion_rev")
git -C "$relion_git" archive --format=tar.gz --prefix=relion/ -o "$dest/relion-${commit:0:8}.tar.gz" "$commit"
tiff_commit=$(git -C "$tiff_git" rev-parse "$tiff_rev^{commit}")
git -C "$tiff_git" archive --format=tar.gz --prefix=libtiff/ -o "$dest/libtiff-$tiff_rev.tar.gz" "$tiff_commit"

(cd "$tmp" && apt-get download libfftw3-dev >/dev/null 2>&1) || { echo "apt-get download libfftw3-dev failed" >&2; exit 1; }
dpkg -x "$tmp"/libfftw3-dev_*.deb "$tmp/deb"
mkdir -p "$tmp/fftw/include" "$tmp/fftw/lib"
cp "$tmp/deb/usr/include/fftw3.h" "$tmp/fftw/include/"
lib=$tmp/deb/usr/lib/x86_64-linux-gnu
for p in fftw3 fftw3f; do  # one archive per precision: its planner and its threads, as RELION's own build makes
  mkdir -p "$tmp/$p/core" "$tmp/$p/threads"
  (cd "$tmp/$p/core" && ar x "$lib/lib$p.a") && (cd "$tmp/$p/threads" && ar x "$lib/lib${p}_threads.a")
  ar rcs "$tmp/fftw/lib/lib$p.a" "$tmp/$p"/core/*.o "$tmp/$p"/threads/*.o
done
tar czf "$dest/fftw.tar.gz" -C "$tmp" fftw

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$tmp/whl" "mpich==$MPICH"
python3 -m zipfile -e "$tmp"/whl/mpich-*.whl "$tmp/mpich"
mv "$tmp/mpich/mpich-$MPICH.data/data" "$tmp/mpich-$MPICH"
rm -rf "$tmp/mpich-$MPICH/share" "$tmp/mpich-$MPICH"/lib/libmpi_abi* "$tmp/mpich-$MPICH"/bin/*_abi
chmod +x "$tmp/mpich-$MPICH"/bin/*  # zip entries keep no modes
tar czf "$dest/mpich.tar.gz" -C "$tmp" "mpich-$MPICH"

{
  echo "prepared $(date -Is) on $(hostname)"
  echo "relion   $commit ($(git -C "$relion_git" log -1 --format=%cd "$commit")) from $relion_git"
  echo "libtiff  $tiff_rev $tiff_commit from $tiff_git"
  echo "fftw     Debian $(dpkg-deb -f "$tmp"/libfftw3-dev_*.deb Version) libfftw3-dev (static, threads merged)"
  echo "mpich    $MPICH (PyPI manylinux_2_28 wheel)"
  (cd "$dest" && sha256sum ./*.tar.gz)
} > "$dest/SOURCES.txt"
du -sh "$dest"
