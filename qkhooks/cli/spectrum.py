"""``qkhooks spectrum``: the singular modes of every head's W_q^T W_k, from the weights alone.

The library is imported inside the command, not at module level: the parser is built without torch (see
:mod:`qkhooks.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qkhooks.cli import add_model_arguments, command, load_from_args, output_file, write_json
from qkhooks.errors import QKHooksError
from qkhooks.options import LAYERS_HELP


def _spectrum_args(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--layers", help=LAYERS_HELP)
    p.add_argument("--augmented", action="store_true", help="fold biases in through x -> [x; 1]")
    p.add_argument("--json", help="write the per-layer/per-head spectrum as JSON here")
    p.add_argument("--plot", help="write the cosine-by-layer figure here (PNG); per-head spectra go next to it")
    p.add_argument("--rope-bands", type=int, default=0, metavar="N",
                   help="RoPE models: group the rotation frequencies into N bands (highest first) and add each "
                        "band's cos/sin form cosines and energies to --json as 'rope_bands' per layer")


@command("spectrum", "singular modes of W_q^T W_k per head, cosines, weighted averages")(_spectrum_args)
def run_spectrum(args: argparse.Namespace) -> int:
    from qkhooks.models import sites as find_sites
    from qkhooks.models.rope import rope_band_summary
    from qkhooks.plots import plot_cosine_by_layer, plot_head_spectra
    from qkhooks.spectrum import spectrum

    if args.json:
        output_file(args.json, "--json")
    if args.plot:
        plot = output_file(args.plot, "--plot", figure=True)
        output_file(str(plot.with_name(plot.stem + "_spectra" + plot.suffix)), "the per-head spectra figure beside --plot",
                    figure=True)
    if args.rope_bands and not args.json:
        raise QKHooksError("--rope-bands writes its figures to the --json file; add --json FILE.")
    loaded = load_from_args(args, for_images=False)  # the weights alone: no image processor config needed
    spec = spectrum(loaded.model, layers=args.layers, augmented=args.augmented, name=loaded.spec)
    bands = (rope_band_summary(loaded.model, find_sites(loaded.model, args.layers), args.rope_bands)
             if args.rope_bands else None)  # before anything is printed or written: refused for a model without RoPE
    print(spec.table())
    if loaded.note:
        print(f"note: {loaded.note}")
    if args.json:
        payload = spec.to_dict()
        payload["note"] = loaded.note
        payload["biases"] = ("folded in ([x; 1]); each cosine is between the token parts of u_n and v_n (their first d "
                               "coordinates, each renormalised), not between the (d+1)-vectors" if args.augmented
                               else "excluded (bias-free bilinear form)")
        if bands is not None:
            for layer in payload["layers"]:
                layer["rope_bands"] = bands[layer["layer"]]
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    if args.plot:
        plot = Path(args.plot)
        plot_cosine_by_layer(spec, plot)
        spectra = plot.with_name(plot.stem + "_spectra" + plot.suffix)
        plot_head_spectra(spec, spectra)
        print(f"wrote {plot} and {spectra}")
    return 0


