"""(b) The batched spectral engine vs the usual per-matrix loops, with the same results.

1. Eigenvalues of B*L affinity matrices (N = 196): one batched ``torch.linalg.eigvalsh``
   vs a loop of ``scipy.linalg.eigh(eigvals_only=True)``.
2. Clustering of B images (k = 4): ``fanlens.spectral.spectral_clustering`` on the batch vs
   ``sklearn.cluster.SpectralClustering(affinity="precomputed")`` image by image.
3. The default rule's counts (``rel_threshold``) of the B*L matrices without the eigenvalues
   (``spectral.threshold_count``, LDL^T inertia) vs from them (``count_significant`` of the
   eigenvalues); the counts must be equal.

Both sides get the same matrices in the same dtype (float32 by default, ``--dtype float64``)
and do the same work (all eigenvalues; the same k); they run in a shuffled order per round
after a warm-up, ``--rounds`` rounds, median [min, max] and N reported; ``--compete`` runs a
second torch job beside them.

Run: python benchmarks/spectral_engine.py [--images 16] [--blocks 12] [--rounds 9] [--dtype float32]
     [--compete]
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.linalg
import torch
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score

from fanlens import spectral as sp

from _common import Competitor, alternate, machine, ratio_line, spread

GOALS = {"eig": 10.0, "cluster": 30.0}


def tokens(b: int, n: int, c: int, seed: int) -> torch.Tensor:
    """Token sets with 6 latent groups and noise (a realistic, non-trivial spectrum)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, 6, c, generator=g)
    assign = torch.randint(6, (b, n), generator=g)
    x = centers.gather(1, assign[..., None].expand(-1, -1, c))
    return x + 0.8 * torch.randn(b, n, c, generator=g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=196)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--compete", action="store_true")
    args = ap.parse_args()
    n_mat = args.images * args.blocks
    dt = getattr(torch, args.dtype)
    a = sp.affinity(tokens(n_mat, args.tokens, 64, 0)).to(dt)
    a_np = a.numpy()  # the same matrices, the same dtype, for scipy
    a_img = a[: args.images]
    res = {}

    def torch_eig():
        res["ours"] = sp.eigvalsh(a)

    def scipy_eig():
        res["ref"] = [scipy.linalg.eigh(m, eigvals_only=True) for m in a_np]

    def torch_cluster():
        res["lab"] = sp.spectral_clustering(a_img, 4, seed=0)[0]

    def count_eig():
        res["count_eig"] = sp.count_significant(sp.spectrum(a, normalized=False), "rel_threshold")

    def count_inertia():
        res["count_inertia"] = sp.threshold_count(a, "rel_threshold")

    def sklearn_cluster():
        res["ref_lab"] = [SpectralClustering(4, affinity="precomputed", random_state=0).fit_predict(m.numpy())
                          for m in a_img]

    with Competitor(args.compete) as comp:
        t = alternate({"torch": torch_eig, "scipy": scipy_eig, "fanlens": torch_cluster, "sklearn": sklearn_cluster,
                       "count_eig": count_eig, "count_inertia": count_inertia}, rounds=args.rounds)
    ref = np.stack(res["ref"])[:, ::-1]
    rel = np.abs(res["ours"].double().numpy() - ref).max() / np.abs(ref).max()
    r_eig, eig_line = ratio_line(t["scipy"], t["torch"])
    print(f"machine: {machine()}; {comp.label}")
    print(f"eigenvalues of {n_mat} matrices {args.tokens}x{args.tokens} in {args.dtype}:")
    print(f"  batched torch eigvalsh: {spread(t['torch'])}")
    print(f"  scipy eigh loop:        {spread(t['scipy'])}")
    print(f"  scipy / torch: {eig_line} (goal {GOALS['eig']:.0f}x: {'met' if r_eig >= GOALS['eig'] else 'missed'}); "
          f"max |diff| / max|lambda| = {rel:.1e}")
    ari = [adjusted_rand_score(res["ref_lab"][i], res["lab"][i].numpy()) for i in range(args.images)]
    r_cl, cl_line = ratio_line(t["sklearn"], t["fanlens"])
    print(f"clustering {args.images} images (k=4, N={args.tokens}):")
    print(f"  fanlens batched:    {spread(t['fanlens'])}")
    print(f"  sklearn per image:  {spread(t['sklearn'])}")
    print(f"  sklearn / fanlens: {cl_line} (goal {GOALS['cluster']:.0f}x: "
          f"{'met' if r_cl >= GOALS['cluster'] else 'missed'}); ARI vs sklearn median {np.median(ari):.3f}, "
          f"min {min(ari):.3f}")

    r_cnt, cnt_line = ratio_line(t["count_eig"], t["count_inertia"])
    same = int((res["count_eig"] == res["count_inertia"]).sum())
    print(f"rel_threshold counts of {n_mat} matrices without the eigenvalues:")
    print(f"  inertia (threshold_count): {spread(t['count_inertia'])}")
    print(f"  from the eigenvalues:      {spread(t['count_eig'])}")
    print(f"  eigenvalues / inertia: {cnt_line}; counts equal for {same} of {n_mat} matrices")


if __name__ == "__main__":
    main()
