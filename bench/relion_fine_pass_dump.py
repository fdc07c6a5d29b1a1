"""Compare the fine-pass scores of one E-step, sample by sample, with RELION 3.1.3's own.

RELION does not write its per-sample diff2. `patch RELION_SRC` inserts a few lines into a RELION 3.1.3 source tree
(git archive of tag 3.1.3 from github:3dem/relion) so that relion_refine_mpi, with RELION_DUMP_DIR set, prints every
fine-pass sample of iterations 1-2 (and the coarse samples of three particles) as
`iter pass ori_particle_index rot tilt psi x_px y_px diff2 pdf_orientation itrans ihidden_over`; build it with
`cmake .. -DGUI=OFF -DCUDA=OFF -DALTCPU=OFF && make refine_mpi` (about 6 minutes on 2 cores; needs libfftw3-dev,
libopenmpi-dev, libtiff-dev). `ours OUT.pkl CRYOREFINE_ARGS...` runs `cryorefine` with the fine pass's raw scores of
each particle's first E-step saved. `compare OURS.pkl DUMP_DIR` matches the samples (rotation matrix and offset) and
prints the per-particle standard deviation of ours − RELION (diff2 is defined up to a per-particle constant).

Run iteration 1 as a non-final iteration on both sides (our final iteration uses the whole box as its window).
"""

from __future__ import annotations

import collections
import glob
import pickle
import sys
from pathlib import Path

import numpy as np

# ANCHOR is verbatim RELION 3.1.3 source (matched byte for byte) and DUMP is inserted as is: neither is wrapped.
ANCHOR = """											long int ihidden_over = sampling.getPositionOversampledSamplingPoint(ihidden, exp_current_oversampling,
																											iover_rot, iover_trans);
"""  # noqa: E501
DUMP = """											{
												static const char* dumpdir = getenv("RELION_DUMP_DIR");
												if (dumpdir != NULL && iter <= 2 && (exp_ipass == 1 || part_id < 3))
												{
													static FILE* fdump = NULL;
													if (fdump == NULL) { char fn[512]; snprintf(fn, 512, "%s/dump_%d.txt", dumpdir, (int)getpid()); fdump = fopen(fn, "w"); }
													long int ori_id = mydata.particles[part_id].images[img_id].id;
													fprintf(fdump, "%d %d %ld %.6f %.6f %.6f %.6f %.6f %.10f %.10g %ld %ld\\n", iter, exp_ipass, ori_id,
														oversampled_rot[iover_rot], oversampled_tilt[iover_rot], oversampled_psi[iover_rot],
														oversampled_translations_x[iover_trans], oversampled_translations_y[iover_trans], diff2, pdf_orientation, itrans, ihidden_over);
												}
											}
"""  # noqa: E501


def patch(src: str) -> None:
    path = Path(src) / "src" / "ml_optimiser.cpp"
    text = path.read_text()
    if "RELION_DUMP_DIR" in text:
        return
    assert text.count(ANCHOR) == 1, "not a RELION 3.1.3 ml_optimiser.cpp"
    path.write_text("#include <unistd.h>\n" + text.replace(ANCHOR, ANCHOR + DUMP))


def ours(out: str, argv: list[str]) -> None:
    import torch  # noqa: F401

    import cryorefine.estep.diff2 as diff2
    import cryorefine.estep.expectation as expectation
    from cryorefine.cli.main import main

    seen, cap = {}, {}
    fine_projections, fine_log_posterior, fine_scores, fine_pass_inputs = (
        expectation.fine_projections,
        expectation.fine_log_posterior,
        diff2.fine_scores,
        expectation.fine_pass_inputs,
    )

    def inputs(batch, *a):
        cap["batch"] = batch
        return fine_pass_inputs(batch, *a)

    def projections(*a):
        cap["rot"], proj = fine_projections(*a)
        return cap["rot"], proj

    def scores(*a, **k):
        cap["scores"] = fine_scores(*a, **k)
        return cap["scores"]

    def posterior(moved, fine, slots, rows, n_slots, proj, cc):
        out_ = fine_log_posterior(moved, fine, slots, rows, n_slots, proj, cc)
        lg, rows8, batch = out_[0], out_[1], cap["batch"]
        rot = cap["rot"].cpu().numpy()
        for i, p in enumerate(batch.indices[rows.cpu().numpy()]):
            if int(p) not in seen:
                t, col = np.nonzero(np.isfinite(lg[i].cpu().numpy()))
                seen[int(p)] = dict(
                    rot=rot[rows8[i].cpu().numpy()[col]],
                    off=fine.offsets_px[rows[i]].cpu().numpy()[t],
                    score=-cap["scores"][i].cpu().numpy()[t, col],  # diff2 less its constant
                )
        return out_

    expectation.fine_projections, expectation.fine_log_posterior = projections, posterior
    expectation.fine_pass_inputs = inputs
    diff2.fine_scores = scores
    try:
        main(argv)
    finally:
        pickle.dump(seen, open(out, "wb"))


def compare(ours_pkl: str, dump_dir: str) -> None:
    import torch
    from scipy.spatial import cKDTree

    from cryorefine.geometry.euler import euler_to_matrix

    mine = pickle.load(open(ours_pkl, "rb"))
    theirs = collections.defaultdict(list)
    for f in glob.glob(f"{dump_dir}/dump_*.txt"):
        for line in open(f):
            s = line.split()
            if s[0] == "1" and s[1] == "1":
                theirs[int(s[2])].append([float(x) for x in s[3:9]])
    sd, same_set = [], []
    for i, rows in sorted(theirs.items()):
        a = np.array(rows)
        R = euler_to_matrix(*(torch.tensor(a[:, k]) for k in range(3))).numpy().reshape(-1, 9)
        o = mine[i]
        dist, j = cKDTree(np.c_[o["rot"].reshape(-1, 9), o["off"]]).query(np.c_[R, a[:, 3:5]])
        m = dist < 1e-3
        same_set.append(bool(m.all()) and len(a) == len(o["score"]))
        sd.append(float(np.std(o["score"][j[m]] - a[m, 5])))
    print(
        f"particles {len(sd)}; same fine samples {np.mean(same_set):.3f}; sd(ours - RELION) per particle: "
        f"median {np.median(sd):.4f}, 90th percentile {np.percentile(sd, 90):.4f}, max {np.max(sd):.4f} nats"
    )


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    {"patch": lambda: patch(rest[0]), "ours": lambda: ours(rest[0], rest[1:]), "compare": lambda: compare(*rest)}[cmd]()
