# Copied unchanged from /work/shared/bench/add_noise.py (sha256 11d2ba0a4508...), which added the noise for RELION-5's
# timings. Memory: it memory-maps the stack and adds noise 256 images at a time (float64 temporaries of 256 images), and
# estimates the clean variance from ~500 evenly spaced images, so a 9 GB stack needs no 9 GB of RAM. Float32 (mode 2)
# stacks only.
"""Add white Gaussian noise to an MRC stack in place, at a given SNR (mean image variance / noise variance).

usage: add_noise.py STACK.mrcs SNR [SEED=0]   numpy only; prints the noise sigma used.
"""

import sys
import numpy as np

path, snr = sys.argv[1], float(sys.argv[2])
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
hdr = np.fromfile(path, dtype=np.int32, count=256)
nx, ny, nz, mode, next_ = hdr[0], hdr[1], hdr[2], hdr[3], hdr[23]
assert mode == 2, "float32 stacks only"
off = 1024 + int(next_)
data = np.memmap(path, dtype=np.float32, mode="r+", offset=off, shape=(nz, ny, nx))
var = float(np.mean([data[i].var() for i in range(0, nz, max(1, nz // 500))]))
sigma = (var / snr) ** 0.5
rng = np.random.default_rng(seed)
for i in range(0, nz, 256):
    blk = data[i : i + 256]
    blk += rng.normal(0, sigma, blk.shape).astype(np.float32)
data.flush()
print(f"{path}: {nz} images {nx}x{ny}, clean var {var:.4g}, noise sigma {sigma:.4g} (SNR {snr})")
