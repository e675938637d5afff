"""Bi-orthogonal Factor Decomposition (Doshi, Fel, Konkle, Alvarez 2026; our definitions in METHODS B).

Position vs content in every head and mode: each layer's tokens split into a positional factor P (the
per-position mean over images) and a content factor C = X - P; each head's bias-free logits X M X^T split
into CC, CP, PC and PP energies (query factor first), per head and per QK mode, with the global-mean share
reported apart, specialisation labels, participation ratios, and held-out position probes on X, P and C.

Two passes over the same images (:func:`run_bfd`): pass 1 streams P (:class:`PositionMeans`), pass 2 the
energies and the probes with P fixed (:class:`BFDEnergies`, :class:`PositionDecoding`). With a run file
both passes go through :func:`qkhooks.stream.record_dataset`, so both are checkpointed and resumable: pass 1
into ``RUN.pass1.h5`` next to the run file, pass 2 into the run file itself. The result is a pure function
of the run file's saved states (:func:`read_bfd`), which is what ``qkhooks analyze bfd`` recomputes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from qkhooks.analysis.bfd_reducers import (
    BFDEnergies,
    PositionDecoding,
    PositionMeans,
    full_modes,
    layer_state,
    patch_targets,
)
from qkhooks.analysis.bfd_summary import (
    CELLS,
    DEFINITIONS,
    HOLDOUT_HOW,
    MIN_HOLDOUT,
    TERMS,
    check_alpha,
    decoding_r2,
    energy_tables,
    holdout_images,
    refuse_one_image,
    paper_claims,
    summarize,
)
from qkhooks.errors import QKHooksError, RunInterrupted
from qkhooks.models.base import find_sites

__all__ = [
    "run_bfd",
    "read_bfd",
    "position_factors",
    "pass1_path",
    "summarize",
    "paper_claims",
    "plot_bfd",
    "FIGURE_CAPTIONS",
    "format_table",
    "check_head",
    "PositionMeans",
    "BFDEnergies",
    "PositionDecoding",
    "full_modes",
    "patch_targets",
    "energy_tables",
    "decoding_r2",
    "DEFINITIONS",
    "TERMS",
    "CELLS",
]

FIGURE_CAPTIONS = (
    "Energy shares CC/CP/PC/PP (query factor first) of every head; vertical lines separate the layers: which "
    "heads specialise.",
    "Shares averaged over heads across depth (band: spread over heads), with CP+PC coupling and the share the "
    "global mean takes in the three-way view.",
    "Mode energy concentration: participation ratio (Σe)²/Σe² of each head's per-mode energies, mean over heads "
    "per layer (band: spread over heads), next to the number of modes: low = a few modes carry the head.",
    "One head's modes in order of energy, each bar split into CC/CP/PC/PP (height: the mode's share of the head's "
    "mode energies; under the Frobenius definition these do not add up to the head's energy).",
    "Held-out R² of linear probes decoding patch row/column from X and C (held-out images) and from P (held-out "
    "positions), and the positional share of variance; the axis stops at R² = −1 (lower values sit on the edge).",
)
"""Captions of :func:`plot_bfd`'s figures, in its order; it hands each file back under its caption (the concentration
and mode figures need per-mode entries, the last one the position probes; all are in a default :func:`run_bfd`
result)."""

R2_FLOOR = -1.0
"""Lowest R² drawn: an R² far below 0 only says the probe fails, and would squash the curves that work."""


def pass1_path(out: str | os.PathLike) -> Path:
    """The run file of pass 1 (the position means, reducer ``bfd_position_means``) next to ``out``."""
    out = Path(out)
    return out.with_name(out.stem + ".pass1" + (out.suffix or ".h5"))


# ------------------------------------------------------------------------------------------ driving
def _is_tensors(data: Any) -> bool:
    return isinstance(data, torch.Tensor) or (
        isinstance(data, (list, tuple)) and bool(data) and all(isinstance(b, torch.Tensor) for b in data)
    )


def _tensor_pass(net: nn.Module, batches: Sequence[torch.Tensor], reducers: list[Any], layers: list[int],
                 input: str, device: Any) -> None:
    """One pass over preprocessed image tensors through ``qkhooks.record`` (no run file)."""
    from qkhooks.capture import record

    dtype = next(net.parameters()).dtype
    # the reducers take each layer's tokens in its hook (no tokens kept to the batch's end); the ids are the ones the
    # recording would make (its one rule), given up front so that the position probes split each layer's tokens there
    with record(net, modes=None, layers=layers, input=input, sinks=reducers) as run:
        for pixels in batches:
            with torch.no_grad():
                run(pixels.to(device=device, dtype=dtype), ids=run.default_ids(len(pixels)))


def _one_size(batches: list[torch.Tensor]) -> torch.Tensor:
    """Preprocessed batches as one tensor, refused where their image sizes differ: BFD's position factor is a mean
    position by position, over one grid."""
    sizes = sorted({tuple(b.shape[1:]) for b in batches})
    if len(sizes) > 1:
        raise QKHooksError(f"the batches hold images of {len(sizes)} shapes ({', '.join(map(str, sizes))}); BFD "
                           "compares tokens position by position, so it needs one input size (one patch grid) for the "
                           "whole dataset: resize them to one size.")
    return torch.cat(batches)


def check_holdout(holdout_every: Any, decode: bool = True) -> None:
    """Refuse a ``holdout_every`` (``--holdout-every``) that holds out no image or every one, where probes are fitted."""
    if decode and int(holdout_every) < 2:
        raise QKHooksError(f"holdout_every must be >= 2 (one image in that many is held out), got {holdout_every}.")


def run_bfd(
    model: Any,
    data: Any,
    out: str | os.PathLike | None = None,
    *,
    layers: Sequence[int | str] | str | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    input: str = "normed",
    drop_prefix: bool = False,
    holdout_every: int = 5,
    alpha: float = 1e-3,
    definition: str = "frobenius",
    decode: bool = True,
    per_mode: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    random_init: bool = False,
    progress: bool = False,
    num_workers: int | None = None,
    image_column: str | None = None,
) -> dict[str, Any]:
    """Bi-orthogonal Factor Decomposition of every (chosen) layer, head and mode over a dataset.

    Args:
        model: a :class:`qkhooks.LoadedModel`, a model spec string or an ``nn.Module``.
        data: a dataset spec (``samples``, a folder, ``o3:8``, ...) or an opened ImageDataset; or image
            tensors already preprocessed ((n, 3, H, W) or a list of batches), then without a run file.
        out: run file (HDF5) for pass 2's reducer states; pass 1 goes to :func:`pass1_path` next to it.
            Both are resumable like a recording run. None keeps everything in memory.
        layers: block indices or attention module paths (``"0,3,5-7"``, ``"blocks.5.attn"`` or a list; None: all).
        batch_size, device, limit: images per forward, where, and how many in all.
        input: ``"normed"`` (default: the exact tensor entering W_q/W_k, METHODS B.1) or ``"residual"`` (the
            block's input before its LayerNorm; the logits are then not the model's).
        drop_prefix: leave prefix tokens (CLS, registers) out of the factors (default: they are positions).
        holdout_every: one image in this many is held out for the position probes.
        alpha: relative ridge strength of the probes.
        definition: ``"frobenius"`` (head-level Frobenius energies, B.2) or ``"additive"`` (per-mode,
            per-side split, B.3) fills the top-level numbers; both are always in the result.
        decode: run the position probes.
        per_mode: include per-mode entries in the result.
        resume, overwrite: what to do when ``out`` or its pass-1 file exists (neither: an error).
        random_init: with a spec string, build the model without pretrained weights.
        progress: show progress bars.
        num_workers, image_column: how a dataset spec is read, as for :func:`qkhooks.record_dataset` (processes
            that decode images, default for the device; a Hugging Face dataset's image column). Not for tensors.

    Returns:
        The JSON-shaped result (see :func:`summarize`), with ``input`` and the model's ``note`` added.

    Raises QKHooksError for fewer than 2 images: the position factor is the mean over images, so with one image
    the content factor is zero by construction (checked before the passes for tensors, after pass 1 otherwise),
    and for images that all give the same tokens (content at float rounding, found after pass 2).
    """
    from qkhooks.models.load import LoadedModel, load_model
    from qkhooks.options import RecordOptions
    from qkhooks.stream import check_options  # the recording core; imported where a BFD run starts

    if resume and overwrite:
        raise QKHooksError("resume and overwrite exclude each other: pick one.")
    if definition not in ("frobenius", "additive"):  # checked before the passes, not after them
        raise QKHooksError(f"definition must be 'frobenius' or 'additive', got {definition!r}.")
    alpha = check_alpha(alpha)  # before the passes: alpha <= 0 fits no probe
    check_holdout(holdout_every, decode)
    check_options(RecordOptions(batch_size=batch_size, limit=limit, num_workers=num_workers))
    tensors = _is_tensors(data)
    if tensors and out is not None:
        raise QKHooksError("a run file needs a dataset spec or an ImageDataset (resume needs image ids); with image "
                           "tensors pass out=None.")
    given = [name for name, value in (("num_workers", num_workers), ("image_column", image_column)) if value is not None]
    if tensors and given:
        raise QKHooksError(f"{' and '.join(given)} say how a dataset is read, and image tensors are read as they are: "
                           "leave them out, or pass a dataset spec.")
    if isinstance(model, LoadedModel):
        loaded = model
    elif tensors and isinstance(model, nn.Module):
        loaded = None  # preprocessed tensors: the module as it is, no image config needed
    else:
        loaded = load_model(model, random_init=random_init, device=device)
    net = model if loaded is None else loaded.model
    label = (getattr(net, "qkhooks_spec", "") or type(net).__name__) if loaded is None else loaded.spec
    note = "" if loaded is None else loaded.note
    net = net.to(device)
    sites = find_sites(net, layers)  # block indices or module paths, as record's layers=
    images = (data if isinstance(data, torch.Tensor) else _one_size(list(data))) if tensors else None
    image_size = tuple(images.shape[-2:]) if images is not None else tuple(loaded.image_config.size)
    kept, left_out, geometry = bfd_layers(net, sites, image_size, device)
    if not kept:
        raise QKHooksError("BFD has no layer of this model to decompose: "
                           + "; ".join(f"L{l}: {why}" for l, why in sorted(left_out.items())) + ".")
    sites = [s for s in sites if s.layer in kept]
    chosen = [s.layer for s in sites]
    prefix, grid = geometry[chosen[0]].num_prefix_tokens, geometry[chosen[0]].grid
    added = added_terms(net, sites, image_size, device)

    if tensors:
        refuse_one_image(int(images[:limit].shape[0]))  # before any pass: the ANOVA needs 2 images
        batches = list(images[:limit].split(batch_size))

        def one_pass(path: Path | None, reducers: list[Any]) -> None:
            _tensor_pass(net, batches, reducers, chosen, input, device)
    else:
        from qkhooks.stream import record_dataset

        if out is not None and not (resume or overwrite):
            for path in (pass1_path(out), Path(out)):
                if path.exists():
                    raise QKHooksError(f"{path} exists: pass resume=True (--resume) to continue the BFD run or "
                                       "overwrite=True (--overwrite) to start again.")
        # before pass 1 touches its file (round 38: --overwrite replaced pass 1 and then refused one image; a
        # --resume into a `record` run ran all of pass 1 before pass 2 refused the file)
        _refuse_few_images(loaded, data, limit, image_column)
        bfd_extra = {"bfd": {"drop_prefix": drop_prefix, "holdout_every": holdout_every, "decode": decode}}
        if out is not None and resume:
            names = [BFDEnergies.name] + ([PositionDecoding.name] if decode else [])
            for path, reducer_names in ((pass1_path(out), [PositionMeans.name]), (Path(out), names)):
                _refuse_other_run(path, {"model": loaded.spec, "layers": chosen, "input": input, "limit": limit,
                                         "extra": bfd_extra, "reducers": reducer_names, "modes": None,
                                         "attention": [], "store_modes": False})

        def one_pass(path: Path | None, reducers: list[Any]) -> None:
            # pass 2's file is not there yet when pass 1 was the one stopped: starting it is no typo to warn of
            again = resume and not (path == Path(out) and not os.path.lexists(path))
            record_dataset(loaded, data, path, modes=None, layers=chosen, input=input, reducers=reducers,
                           batch_size=batch_size, device=device, limit=limit, resume=again, overwrite=overwrite,
                           progress=progress, store_modes=False, num_workers=num_workers, image_column=image_column,
                           extra_config=bfd_extra)

    stage = 1  # where a stop (Ctrl-C, SIGTERM) finds the run: _stopped says it, with what each file holds
    try:
        pass1 = PositionMeans(chosen)
        one_pass(None if out is None else pass1_path(out), [pass1])
        stage = 2
        means = pass1.means()
        refuse_one_image(min(pass1.counts.values()))  # after pass 1, before pass 2: one image has no content factor
        reducers: list[Any] = [BFDEnergies(full_modes(sites), means, prefix, drop_prefix)]
        if decode:
            reducers.append(PositionDecoding(means, grid, prefix, holdout_every))
        stage = 3
        one_pass(None if out is None else Path(out), reducers)
        stage = 4
        result = summarize(reducers[0].state_dict(), reducers[1].state_dict() if decode else None, model=label,
                           definition=definition, alpha=alpha, per_mode=per_mode)
    except KeyboardInterrupt as exc:
        raise _stopped(stage, exc, out, overwrite) from exc
    result["input"] = input
    content_only = {str(s.layer): s.content_only() for s in sites if s.content_only()}
    content_only.update({str(l): "; ".join(filter(None, [content_only.get(str(l)), why]))
                         for l, why in added.items()})
    if content_only:  # RoPE, q/k-norm, CaiT, an added relative-position term: the form BFD splits is the content term
        result["variant"] = ("content-only: the energies split the content form W_q^T W_k, not the model's logits, "
                             "in layers " + ", ".join(content_only) + ": " + "; ".join(sorted(set(content_only.values()))))
        result["content_only_layers"] = content_only
    if left_out:  # never a silent drop: the layers BFD's one form and one grid do not describe, with the reason
        result["left_out_layers"] = {str(l): why for l, why in sorted(left_out.items())}
    if note:
        result["note"] = note
    return result


_PASS1 = "pass 1 of 2 (the position means)"
_PASS2 = "pass 2 of 2 (the energies and position probes)"


def _stopped(stage: int, exc: KeyboardInterrupt, out: str | os.PathLike | None, overwrite: bool) -> RunInterrupted:
    """What a stop (Ctrl-C, SIGTERM: a KeyboardInterrupt) says at ``stage`` of :func:`run_bfd` (1: pass 1 running,
    2: between the passes, 3: pass 2 running, 4: summarising): which pass ran, what each file holds, what to run.
    ``exc``'s own words (a :class:`RunInterrupted` from the pass's recording: its file's committed images and
    checkpoint) are kept."""
    where = {1: f"during {_PASS1}", 2: f"between {_PASS1} and {_PASS2}", 3: f"during {_PASS2}",
             4: "after both passes, while the result was summarised"}[stage]
    if out is None:
        return RunInterrupted(f"BFD stopped {where}; nothing was written (no run file: out=None): run it again.")
    first, second = pass1_path(out), Path(out)
    again = "the same command with --resume" + (" in place of --overwrite" if overwrite else "")
    said = str(exc).rstrip(".") if isinstance(exc, RunInterrupted) and str(exc) else ""
    if stage == 1:
        held = said or f"{first} is as the pass left it before its recording began; {again} continues pass 1"
        return RunInterrupted(f"BFD stopped {where}, recorded into {first}: {held}. Pass 2 has not touched {second}: "
                              "the resume runs it once pass 1 is done.")
    if stage == 2:
        return RunInterrupted(f"BFD stopped {where}: pass 1 is complete in {first}, and pass 2 has not touched "
                              f"{second}; {again} reads pass 1's means from {first.name} (recording none of it again) "
                              "and runs pass 2.")
    if stage == 3:
        held = said or f"{second} is as the pass left it before its recording began; {again} continues pass 2"
        return RunInterrupted(f"BFD stopped {where}, recorded into {second}: {held}. Pass 1 is complete in {first}: "
                              "the resume does not record it again.")
    return RunInterrupted(f"BFD stopped {where}: both passes are complete ({first}, {second}); {again} reads their "
                          "states and summarises again, recording no image.")


def _refuse_few_images(loaded: Any, data: Any, limit: int | None, image_column: str | None) -> None:
    """refuse_one_image for a dataset whose size is known when opened (a stream's is counted by pass 1)."""
    from qkhooks.data.sources import ItemStream, open_source

    dataset = open_source(data, loaded.image_config, limit=limit, image_column=image_column)
    if isinstance(dataset, ItemStream):
        count = dataset.length
    else:
        count = len(dataset.ids) if limit is None else min(len(dataset.ids), int(limit))
    if count is not None:
        refuse_one_image(int(count))


def _refuse_other_run(path: Path, expected: Mapping[str, Any]) -> None:
    """A resume of ``path`` that its stored config refuses, refused before any pass runs: the keys of
    ``expected`` must be the file's (a `qkhooks record` run, another model, other layers or BFD options)."""
    import json

    from qkhooks.store import open_run

    if not path.exists():
        return
    try:
        with open_run(path) as run:
            config = dict(run.config)
    except QKHooksError as err:
        raise QKHooksError(f"cannot resume the BFD run at {path}: {err}") from None
    stored = json.loads(json.dumps(config, default=list))
    wanted = json.loads(json.dumps(dict(expected), default=list))
    differ = [key for key in wanted if stored.get(key) != wanted[key]]
    if differ:
        what = ("it is not a file of `qkhooks bfd` (" + ", ".join(stored.get("reducers") or []) + ")"
                if not stored.get("extra") or "bfd" not in (stored.get("extra") or {}) else "its options differ")
        if differ == ["limit"] and what == "its options differ":  # `record --resume` may raise it; BFD may not
            kept = stored.get("limit")
            same = "limit=None (no --limit)" if kept is None else f"limit={kept} (--limit {kept})"
            raise QKHooksError(
                f"cannot resume the BFD run at {path} to another limit (the file's limit {kept}, now "
                f"{wanted['limit']}): pass 2 centres every image's tokens on pass 1's position means over all the "
                "run's images, so other images change what every image adds to pass 2 from the first on, and a "
                f"resume cannot carry its sums on exactly. Resume with {same}, or overwrite=True (--overwrite) to run "
                "both passes again to the new limit, or give another --out (nothing was run or changed).")
        raise QKHooksError(
            f"cannot resume the BFD run at {path}: {what}: "
            + "; ".join(f"{k}: file {stored.get(k)!r}, now {wanted[k]!r}" for k in differ)
            + ". Resume with the same model and options as the first run, give another --out, or --overwrite to "
              "start again (nothing was run or changed).")


def added_terms(net: nn.Module, sites: Sequence[Any], image_size: tuple[int, int],
                device: str | torch.device = "cpu") -> dict[int, str]:
    """Layer -> what the model adds to its logits beside the bilinear form W_q^T W_k that BFD splits: a
    relative-position table (BEiT, ``vit_relpos``, EfficientFormer: position-position energy by construction), a
    query-dependent relative term (SAM/ViTDet), a term that changes with the image; read off one forward of a blank
    image. The energies leave these out, so the result says so (round 33: they were left out without a word)."""
    from qkhooks.capture import record  # the recording core; imported where a BFD run starts
    from qkhooks.stream import refusing_a_failing_size

    found: dict[int, str] = {}
    for site in sites:
        if getattr(site, "relative", None) is not None:
            found[site.layer] = ("the model adds a query-dependent relative-position term to the logits, which the "
                                 "energies leave out")
    dtype = next(net.parameters()).dtype
    with record(net, modes=1, sites=list(sites)) as run, torch.no_grad(), \
            refusing_a_failing_size(net, run, image_size):
        run(torch.zeros(1, 3, *image_size, device=device, dtype=dtype))
    for site in sites:
        try:
            bias = run.bias(site.layer)
        except QKHooksError as err:
            found[site.layer] = f"the model adds a term to the logits that the energies leave out ({err})"
            continue
        if bias is not None and bool(bias.ne(0).any()):
            found[site.layer] = ("the model adds a relative-position table to the logits (position-position by "
                                 "construction), which the energies leave out (run.bias(l) gives it)")
    return found


def bfd_layers(net: nn.Module, sites: Sequence[Any], image_size: tuple[int, int],
               device: str | torch.device = "cpu") -> tuple[list[int], dict[int, str], dict[int, Any]]:
    """(layers BFD decomposes, layer -> why it leaves it out, every layer's geometry).

    BFD splits one bilinear form over every pair of one token grid by a position factor P (the mean token at each
    grid position) shared by queries and keys. Left out, with the reason: windowed layers (their logits pair only
    the tokens of one window, shifted windows move with the layer, so a form over every pair is not the model's),
    spatially reduced keys (the keys are other tokens, on another grid, so one P cannot serve both sides), and
    layers on another grid or prefix than the first kept one (one run holds one P grid; record those with
    ``--layers``)."""
    from qkhooks.stream import probe_geometry  # the recording core; imported where a BFD run starts

    geometry = probe_geometry(net, sites, image_size, device)
    left_out: dict[int, str] = {}
    kept: list[int] = []
    for site in sites:
        g = geometry[site.layer]
        if g.windowed:
            left_out[site.layer] = ("windowed attention: its logits pair only the tokens of one window, so BFD's one "
                                    "form over every token pair is not the model's")
        elif g.reduced_keys:
            left_out[site.layer] = ("spatially reduced keys: the keys are other tokens on another grid, so one "
                                    "position factor cannot serve queries and keys")
        elif g.grid is None:
            left_out[site.layer] = f"its token grid is unknown ({g.describe()})"
        elif kept and (g.grid, g.num_prefix_tokens) != (geometry[kept[0]].grid, geometry[kept[0]].num_prefix_tokens):
            left_out[site.layer] = (f"its grid ({g.describe()}) is not layer {kept[0]}'s, and one BFD run holds one "
                                    f"position grid; run `qkhooks bfd --layers {site.layer}` for it")
        else:
            kept.append(site.layer)
    return kept, left_out, geometry


# ---------------------------------------------------------------------------------------- run files
def _states(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """(energies state, decoding state or None, run facts) of a complete BFD run file."""
    from qkhooks.store import open_run

    with open_run(path) as run:
        energies, decoding = run.state(BFDEnergies.name, default=None), run.state(PositionDecoding.name, default=None)
        complete, attrs, config = run.complete, run.attrs, run.config
    if energies is None:
        raise QKHooksError(f"{path} has no BFD energies (reducer {BFDEnergies.name!r}); write it with `qkhooks bfd`.")
    if not complete:
        raise QKHooksError(f"{path} is an unfinished BFD run: continue it with `qkhooks bfd ... --resume`.")
    for state in (energies, decoding):
        if state is not None:
            state.pop("_images", None)
    facts = {"model": str(attrs.get("model", "")), "note": str(attrs.get("model_note", "") or ""),
             "input": config.get("input", "normed")}
    return energies, decoding, facts


def read_bfd(path: str | os.PathLike, *, definition: str = "frobenius", alpha: float = 1e-3,
             per_mode: bool = True) -> dict[str, Any]:
    """The BFD result of a run file written by :func:`run_bfd`, recomputed from its saved reducer states."""
    energies, decoding, facts = _states(path)
    result = summarize(energies, decoding, model=facts["model"], definition=definition, alpha=alpha,
                       per_mode=per_mode)
    result["input"] = facts["input"]
    if facts["note"]:
        result["note"] = facts["note"]
    return result


def position_factors(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """Layer -> P (N, d), the position factor of a BFD run file (prefix rows left out if they were dropped)."""
    energies, _, _ = _states(path)
    return {int(l): layer_state(energies, int(l))["P"] for l in np.asarray(energies["layers"]).reshape(-1)}


# -------------------------------------------------------------------------------------------- report
def format_table(result: dict[str, Any]) -> str:
    """A per-layer text table: variance share, mean head shares, coupling, interference, probes."""
    lines = [
        f"BFD of {result.get('model') or 'model'} over {result.get('images')} images "
        f"({result['definition']} shares, mean over heads; G = global-mean share of the three-way view)",
        f"{'layer':>5} {'posvar':>6} {'CC':>6} {'CP':>6} {'PC':>6} {'PP':>6} {'CP+PC':>6} {'interf':>7} {'G':>6} "
        f"{'R2(X)':>6} {'R2(P)':>6} {'R2(C)':>6}",
    ]

    def fmt(v: Any, w: int = 6) -> str:
        return f"{v:>{w}.3f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

    for layer in result["layers"]:
        dec, e = layer.get("decoding", {}), layer["energy"]
        lines.append(
            f"{layer['layer']:>5} {fmt(layer['position_variance_share'])} {fmt(e['CC'])} {fmt(e['CP'])} {fmt(e['PC'])} "
            f"{fmt(e['PP'])} {fmt(layer['coupling'])} {fmt(layer['interference'], 7)} {fmt(layer['global_mean_share'])} "
            f"{fmt(dec.get('X', {}).get('mean'))} {fmt(dec.get('P', {}).get('mean'))} {fmt(dec.get('C', {}).get('mean'))}"
        )
    held = holdout_images(result)
    if any(layer.get("decoding") for layer in result["layers"]) and held < MIN_HOLDOUT:
        lines.append(f"R2(X) and R2(C) are tested on {held} held-out image{'s' * (held != 1)}, fewer than {MIN_HOLDOUT}: not to be read "
                     f"({HOLDOUT_HOW}).")
    for layer in result["layers"]:
        if layer.get("decoding", {}).get("note"):
            lines.append(f"probes of layer {layer['layer']}: {layer['decoding']['note']}")
    return "\n".join(lines)


def _numbers(values: Sequence[int]) -> str:
    """``0-11`` for consecutive integers, else ``0,2,5``."""
    if len(values) > 2 and list(values) == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


def _pick_head(result: dict[str, Any], head: tuple[int, int] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    pairs = [(layer, h) for layer in result["layers"] for h in layer["heads"]]
    if head is None:
        return max(pairs, key=lambda lh: -1.0 if lh[1]["coupling"] is None else lh[1]["coupling"])
    for layer, h in pairs:
        if (layer["layer"], h["head"]) == tuple(head):
            return layer, h
    heads = "; ".join(f"L{layer['layer']}: H{_numbers([h['head'] for h in layer['heads']])}" for layer in result["layers"])
    raise QKHooksError(f"head L{head[0]} H{head[1]} is not in this result; pick a recorded layer and head ({heads}).")


def check_head(result: dict[str, Any], head: tuple[int, int] | None) -> None:
    """QKHooksError unless ``head`` (layer, head) is in ``result`` (None: the default head, always there)."""
    _pick_head(result, head)


def plot_bfd(result: dict[str, Any], out_dir: str | os.PathLike,
             head: tuple[int, int] | None = None) -> dict[str, Path]:
    """The BFD figures, each file under its caption (:data:`FIGURE_CAPTIONS`, in that order): shares per head,
    per-layer averages, mode energy concentration, one head's modes, position probes by layer. A figure the result
    has no numbers for (no per-mode entries, no probes) is left out, so read a figure by its caption, not its place.

    ``head`` = (layer, head) for the mode figure (default: the head with the largest CP + PC coupling).
    """
    from qkhooks.plots import plot_layer_curves, plot_stacked_shares

    out_dir = Path(out_dir)
    layer, h = _pick_head(result, head)  # before any figure: a head not in the result writes nothing
    name, definition = result.get("model") or "model", result["definition"]
    paths: dict[str, Path] = {}
    labels = [f"H{h['head']}" for l in result["layers"] for h in l["heads"]]
    groups = [f"L{l['layer']}" for l in result["layers"] for _ in l["heads"]]
    shares = {t: [h["energy"][t] or 0.0 for l in result["layers"] for h in l["heads"]] for t in TERMS}
    paths[FIGURE_CAPTIONS[0]] = plot_stacked_shares(labels, shares, out_dir / "bfd_heads.png",
                                                    f"BFD energy shares per head ({definition}) — {name}",
                                                    "share of energy", groups)
    layers = [l["layer"] for l in result["layers"]]
    curves = {t: [l["energy"][t] for l in result["layers"]] for t in TERMS}
    curves["CP+PC"] = [l["coupling"] for l in result["layers"]]
    curves["global mean (three-way)"] = [l["global_mean_share"] for l in result["layers"]]
    spread = {t: [l["energy_std"][t] or 0.0 for l in result["layers"]] for t in TERMS}
    paths[FIGURE_CAPTIONS[1]] = plot_layer_curves(
        layers, _nan(curves), out_dir / "bfd_layers.png", "share (mean over heads)",
        f"BFD shares by layer ({definition}; band = spread over heads) — {name}", spread)
    pr = np.array([[np.nan if h.get("participation_ratio") is None else h["participation_ratio"] for h in l["heads"]]
                   for l in result["layers"]], dtype=float)
    if np.isfinite(pr).any():
        modes = max(len(h.get("modes", [])) for l in result["layers"] for h in l["heads"])
        paths[FIGURE_CAPTIONS[2]] = plot_layer_curves(
            layers, {"participation ratio (mean over heads)": np.nanmean(pr, 1)}, out_dir / "bfd_concentration.png",
            "effective number of modes", f"Mode energy concentration ({definition}; {modes} modes per head) — {name}",
            {"participation ratio (mean over heads)": np.nanstd(pr, 1)}, ylim=(0, None))
    if h.get("modes"):
        modes = sorted(h["modes"], key=lambda m: m["rank"])
        scaled = {t: [(m["energy"][t] or 0.0) * (m["share_of_head"] or 0.0) for m in modes] for t in TERMS}
        paths[FIGURE_CAPTIONS[3]] = plot_stacked_shares(
            [f"M{m['mode']}" for m in modes], scaled, out_dir / f"bfd_modes_L{layer['layer']}H{h['head']}.png",
            f"L{layer['layer']} H{h['head']}: modes by energy, split ({definition}) — {name}",
            "share of the head's mode energies")
    if any("decoding" in l for l in result["layers"]):
        dec = {f"R² from {f}": [l.get("decoding", {}).get(f, {}).get("mean") for l in result["layers"]] for f in "XPC"}
        dec["position variance share"] = [l["position_variance_share"] for l in result["layers"]]
        dec = {k: [v if v is None else max(v, R2_FLOOR) for v in vals] for k, vals in dec.items()}
        held = holdout_images(result)
        paths[FIGURE_CAPTIONS[4]] = plot_layer_curves(
            layers, _nan(dec), out_dir / "bfd_decoding.png", "held-out R² (row, col mean)",
            f"Position decoding from X, P, C ({held} held-out images) — {name}", ylim=(R2_FLOOR - 0.05, 1.05))
    return paths


def _nan(curves: dict[str, list[Any]]) -> dict[str, list[float]]:
    return {k: [np.nan if v is None else v for v in vals] for k, vals in curves.items()}
