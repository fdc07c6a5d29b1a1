#!/bin/bash
# Issue 23's RELION-5 beside ours, step 2 of 3, on the device (no network): build relion_refine from what
# bench/relion5/prepare.sh put in .relion5/ (carry it), with CUDA for sm_90 (H100/H200), into $RELION5_HOME
# (default /tmp/relion5, kept while the machine stays warm; outside the repository so that carrying .relion5 again
# does not replace the build). A second call finds the build and returns at once; a call cut off by its time limit
# continues where make stopped.
#   usage: bash bench/relion5/build.sh            env: RELION5_HOME, RELION5_CUDA (ON|OFF), CUDA_ARCH (90), JOBS
# Prints the path of relion_refine last. RELION's CMake needs MPI (MPICH from .relion5), TIFF (libtiff built here
# without codecs, static) and FFTW (placed where RELION looks for a copy it built itself, external/fftw, so it
# downloads nothing). Only relion_refine and relion_refine_mpi (targets refine, refine_mpi) are built, of ~100.
set -euo pipefail
src=$(git rev-parse --show-toplevel 2>/dev/null || pwd)/.relion5
R=${RELION5_HOME:-/tmp/relion5}
cuda=${RELION5_CUDA:-ON}
arch=${CUDA_ARCH:-90}
jobs=${JOBS:-$(nproc)}
bin=$R/relion/build/bin
if [ -x "$bin/relion_refine" ]; then echo "$bin/relion_refine"; exit 0; fi
for f in relion-*.tar.gz libtiff-*.tar.gz fftw.tar.gz mpich.tar.gz; do
  compgen -G "$src/$f" >/dev/null || { echo "no $src/$f: run bench/relion5/prepare.sh here first and carry .relion5" >&2; exit 2; }
done
mkdir -p "$R" && cd "$R"
[ -d relion ] || { for f in "$src"/*.tar.gz; do tar xzf "$f"; done; }
mpich=$(echo "$R"/mpich-*)
export PATH=$mpich/bin:$PATH

if [ ! -f tiff/lib/libtiff.a ]; then
  off=(-Djpeg=OFF -Dold-jpeg=OFF -Djbig=OFF -Dlerc=OFF -Dlzma=OFF -Dzstd=OFF -Dwebp=OFF -Dzlib=OFF -Dlibdeflate=OFF
       -Dpixarlog=OFF -Dtiff-cxx=OFF -Dtiff-opengl=OFF -Dtiff-tools=OFF -Dtiff-tests=OFF -Dtiff-contrib=OFF -Dtiff-docs=OFF)
  cmake -S libtiff -B libtiff/build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
    -DCMAKE_INSTALL_PREFIX="$R/tiff" -DCMAKE_INSTALL_LIBDIR=lib "${off[@]}" > libtiff-cmake.log
  cmake --build libtiff/build -j "$jobs" > libtiff-build.log && cmake --install libtiff/build > /dev/null
fi

mkdir -p relion/external && rm -rf relion/external/fftw && cp -r fftw relion/external/fftw
if [ ! -f relion/build/Makefile ]; then
  # CMAKE_POLICY_VERSION_MINIMUM: RELION asks for CMake 2.8, which CMake 4 refuses; 3.5 keeps FindCUDA's old policy.
  # RELION_NVCC_FLAGS_RELEASE: RELION's own nvcc flags less its -D__INTEL_COMPILER, which makes CUDA 13's libcu++
  # take the host compiler for Intel's and use a type-trait builtin that GCC 13 then rejects ("use of built-in trait
  # '__remove_reference(_Tp)' in function signature"; seen on the device, 2026-12-05).
  cmake -S relion -B relion/build -DCMAKE_BUILD_TYPE=Release -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
    -DCUDA="$cuda" -DCUDA_ARCH="$arch" -DGUI=OFF -DFETCH_WEIGHTS=OFF -DALTCPU=OFF \
    "-DRELION_NVCC_FLAGS_RELEASE=-arch=sm_$arch --default-stream per-thread --std=c++17 --disable-warnings" \
    -DMPI_C_COMPILER="$mpich/bin/mpicc" -DMPI_CXX_COMPILER="$mpich/bin/mpicxx" \
    -DTIFF_INCLUDE_DIR="$R/tiff/include" -DTIFF_LIBRARY="$R/tiff/lib/libtiff.a" 2>&1 | tee relion-cmake.log | tail -5
fi
cmake --build relion/build -j "$jobs" --target refine refine_mpi > relion-build.log 2>&1 \
  || { tail -30 relion-build.log; exit 1; }
"$bin/relion_refine" --version 2>&1 | head -3 || true
echo "$bin/relion_refine"
