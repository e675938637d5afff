"""Round 18 (review F3): how far the q/k path's maps are from x·u_n, and which layers take it.

    python benchmarks/round18_qkpath_precision.py                      # this checkout's qkhooks
    python benchmarks/round18_qkpath_precision.py --library /tmp/old  # another copy (git archive <rev> qkhooks)

For random-init timm ViT-S/16 and ViT-B/16 (pretrained=False, seed 0) and the bundled DINOv2-S/14
(``offline:dinov2-s14``), at modes=16 and modes="all", two random 224 x 224 images, 1 thread: per layer the path
``run.mode_source`` took, the largest error amplification of a kept mode (both sides, every head; computed here in
numpy, independently of the library: a_n = lstsq(W_q^T, u_n), kappa = ||a_n|| ||W_q||_2, and with the bias term
||a_n|| (||W_q||_2 + ||b_q|| / sqrt(d)) that the library's rule uses) and the maps' largest relative error against
float64 x·U (x the tokens entering the attention module, U the recording's own float32 spectrum): per mode,
max |error| / max |reference map| over images and tokens, the largest over heads, modes and both sides. Prints one
table per model and modes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", default=str(Path(__file__).resolve().parents[1]),
                        help="folder holding the qkhooks package to measure (default: this checkout)")
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224,offline:dinov2-s14")
    args = parser.parse_args()
    sys.path[:0] = [args.library]

    import numpy as np
    import timm
    import torch

    import qkhooks

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    print(f"qkhooks from {qkhooks.__file__}")
    for name in args.models.split(","):
        if name.startswith("offline:"):
            model = qkhooks.load_model(name).model.eval()
        else:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval()
        images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        sites = qkhooks.sites(model)
        tokens: dict[int, np.ndarray] = {}

        def keep(layer, input_name):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs[input_name]
                tokens[layer] = x.detach().double().numpy()
            return hook

        hooks = [s.module.register_forward_pre_hook(keep(s.layer, s.input_name), with_kwargs=True) for s in sites]
        model(images)
        for h in hooks:
            h.remove()
        for modes in (16, "all"):
            with qkhooks.record(model, modes=modes) as run:  # the maps in the model's float32
                model(images)
            print(f"\n{name}, modes={modes}")
            print("layer  path  max kappa (no bias)  max kappa (bias term)  max rel. error q / k")
            for site in sites:
                layer = site.layer
                spec = run.spectrum(layer)
                u, v = np.asarray(spec.U, np.float64), np.asarray(spec.V, np.float64)  # (H, d, K)
                w = site.weights()
                kappa, kappa_b = 0.0, 0.0
                for wt, bias, vec in ((w.w_q, w.b_q, u), (w.w_k, w.b_k, v)):
                    wt = wt.double().numpy()
                    for h in range(wt.shape[0]):
                        a = np.linalg.lstsq(wt[h].T, vec[h], rcond=None)[0]
                        norm = np.linalg.norm(wt[h], 2)
                        extra = 0.0 if bias is None else np.linalg.norm(bias[h].double().numpy()) / np.sqrt(wt.shape[2])
                        kappa = max(kappa, float(np.linalg.norm(a, axis=0).max() * norm))
                        kappa_b = max(kappa_b, float(np.linalg.norm(a, axis=0).max() * (norm + extra)))
                x = tokens[layer]
                errors = []
                for got, vec in ((run.query(layer), u), (run.key(layer), v)):
                    ref = np.einsum("bnd,hdk->bhkn", x, vec)
                    got = np.asarray(got, np.float64)
                    errors.append(float((np.abs(got - ref).max(axis=(0, 3)) / np.abs(ref).max(axis=(0, 3))).max()))
                print(f"L{layer:<5d} {run.mode_source[layer]:>3s}   {kappa:18.3g}  {kappa_b:21.3g}  "
                      f"{errors[0]:9.2e} / {errors[1]:.2e}")


if __name__ == "__main__":
    main()
