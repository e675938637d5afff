"""The recording options, defined once: :func:`qkhooks.record_dataset` and the distributed recording take them, the
``qkhooks record`` flags are made from them, and the run file's ``config`` attribute is written from them.

Imports no torch: the command line builds its parser from this module, also for commands that only read files.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from qkhooks.errors import QKHooksError

if TYPE_CHECKING:  # the library never imports argparse; only the command line hands a parser in
    import argparse

__all__ = ["RecordOptions", "RUN_FACTS", "DEFAULT_MODES", "LAYERS_HELP"]

LAYERS_HELP = ("block indices (negative ones from the last: -1) or attention module paths, e.g. '0,3,5-7,-1' or "
               "'blocks.5.attn' (default all)")
"""The help of every command's ``--layers`` that names the model's layers (record, spectrum, bfd)."""

RUN_FACTS = ("model", "data", "reducers", "random_init", "weights", "shard")
"""Keys of the run config that are facts of the recording rather than options: the model spec, the dataset's name,
the reducers' names, whether the weights are random, which weights, and the shard (rank, world) or null."""


class DefaultModes(int):
    """The number of modes kept when none is asked for, told apart from the same number asked for: a head of d_k
    dimensions has d_k modes, and cutting a number nobody asked for to that is not worth a warning."""


DEFAULT_MODES = DefaultModes(16)
"""``modes``' default in :func:`qkhooks.record`, :func:`qkhooks.record_dataset` and ``qkhooks record``: 16, or all a
head has where that is fewer (silently; an explicit ``modes=16`` there warns)."""


def _modes_flag(text: str) -> int | str:
    return int(text) if text.strip().isdigit() else text


def _option(default: Any, help: str | None = None, *, doc: str, flag: str | None = None, config: str | None = None,
            **argparse_kwargs: Any) -> Any:
    """A field with what it does (``doc``: its line in ``help(RecordOptions)``), its ``qkhooks record`` flag (``flag``,
    ``help``, argparse keywords; none: API only) and its key in the run config (``config``; none: the option does
    not change what is recorded, so a resume may change it)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "flag": flag, "help": help, "config": config,
                                                        "argparse": argparse_kwargs})


@dataclasses.dataclass(frozen=True)
class RecordOptions:
    """How a dataset is recorded: what is captured and stored, and how images go through the model.

    Pass it as ``record_dataset(model, data, out, options=RecordOptions(...))``, or give the same names as keywords
    of :func:`qkhooks.record_dataset` (one or the other). Where the data come from (model, data, out), the device,
    the reducers and what to do with an existing file (resume, overwrite) are arguments of the call, not options.
    """

    modes: int | str | None = _option(DEFAULT_MODES, "top modes per head to store, 'all', or 0 / none for no modes (q/k and attention only; default 16)", flag="--modes",
                                      config="modes", type=_modes_flag,
                                      doc='Singular modes kept per head: an integer, ``"all"``, or None/0 (capture '
                                          "q/k and attention only).")

    layers: str | int | Sequence[int | str] | None = _option(
        None, LAYERS_HELP, flag="--layers", config="layers",
        doc='Blocks to hook: an index, indices, a selection string (``"0,3,5-7,-1"``), the attention '
            "modules' dotted paths (``[\"blocks.5.attn\"]``, as ``run.query(\"blocks.5.attn\")`` reads them) or "
            "None for all. The run config stores the block indices found.")

    attention: Any = _option(None, "none, rows, pooled or full, optionally with layers (indices or module paths) and "
                             "combined: 'rows+full:5,11', 'full:blocks.5.attn' (default none)",
                             flag="--attention", config="attention",
                             doc='Attention maps rebuilt from q and k: None, a string such as ``"rows+full:5,11"`` '
                                 "or :class:`qkhooks.AttentionSpec` s. The run config stores the specs as dicts.")

    outputs: str = _option("unchanged", "unchanged (default: the model's outputs bit for bit, full maps rebuilt "
                           "beside its attention) or eager (layers with full maps compute their attention once, from the "
                           "maps: outputs then equal the eager forward)", flag="--outputs", choices=["unchanged", "eager"],
                           doc="What the model's attention runs: its own, unchanged, or, for layers with full maps, "
                               "the recorded maps @ v (q·kᵀ and the softmax once; ``qkhooks.record``'s "
                               "``outputs``). The maps are the same either way, so a resume may change it.")

    input: str = _option("normed", "project the exact tensor entering W_q/W_k (normed, default) or the block's "
                         "residual input", flag="--input", config="input", choices=["normed", "residual"],
                         doc="The token stream the modes project: the normed input of W_q/W_k (exact logits) or the "
                             "residual stream.")

    skip_unmodelled: bool = _option(False, "record the layers qkhooks models exactly and leave out the attention "
                                    "modules it does not (e.g. DaViT's channel attention), each named with its reason "
                                    "in the run file (default: refuse such a model)", flag="--skip-unmodelled",
                                    action="store_true",
                                    doc="Partial recording: leave out modules qkhooks does not model, named in the "
                                        "run file's ``left_out_unmodelled`` (``qkhooks.record``'s "
                                        "``skip_unmodelled``). Not in the config: what is left out is a fact of the "
                                        "model, stored.")

    augmented: bool = _option(False, "fold the q/k biases into the modes through x -> [x; 1]", flag="--augmented",
                              config="augmented", action="store_true",
                              doc="Modes of the bias-augmented form ``[x; 1]`` instead of the bias-free bilinear "
                                  "form.")

    dtype: str = _option("float16", "storage dtype", flag="--dtype", config="dtype", choices=["float16", "float32"],
                         doc="Storage dtype of the per-image float arrays.")

    compression: str = _option("none", "codec for per-image arrays (default none: float16 maps hardly compress; "
                               "see benchmarks)", flag="--compression", choices=["none", "gzip", "lzf"],
                               doc="HDF5 codec of the per-image arrays (``none``, ``gzip``, ``lzf``); "
                                   "benchmarks/RESULTS.md says what each costs.")

    checksum: bool = _option(False, "give the per-image arrays HDF5's Fletcher-32 checksum and store a checksummed "
                             "digest of each image id, so a damaged chunk or id is reported, not read (the writer "
                             "thread's CPU about 2.5x)", flag="--checksum", action="store_true",
                             doc="Per-image arrays get HDF5's Fletcher-32 checksum and each image id a checksummed "
                                 "digest, so a damaged chunk or id is reported, not read; costs the writer thread about "
                                 "2.5x its CPU (README.md). A resume keeps the file's layout (and warns if this "
                                 "differs).")

    batch_size: int = _option(16, "images per forward pass (default 16)", flag="--batch-size", type=int,
                              doc="Images per forward pass.")

    limit: int | None = _option(None, "only the first N images", flag="--limit", config="limit", type=int,
                                metavar="N", doc="Record only the first ``limit`` images of the data. A resume may raise it "
                                "(or give None): the run grows to the new limit, its images so far kept; or lower it "
                                "to no fewer than the images the run holds (an extension stopped midway).")

    num_workers: int | None = _option(None, "processes that decode and preprocess images (any data; default: 0 on "
                                      "the CPU, min(4, cores - 1) beside an accelerator)", flag="--workers",
                                      type=int, metavar="N",
                                      doc="Processes that decode and preprocess images, for every kind of data (0: "
                                          "in this process; None: :func:`qkhooks.stream.default_workers` for the "
                                          "device).")

    image_column: str | None = _option(None, "hfds: the column holding the images (default: the Image feature)",
                                       flag="--image-column",
                                       doc="Hugging Face data: the image column (default: found by its feature "
                                           "type).")

    masks: Mapping[str, str] | None = _option(
        None, doc='Hugging Face data: mask columns, e.g. ``{"objects": "instance_mask"}`` (default: columns named like '
                  "masks).")

    store_modes: bool = _option(True, config="store_modes",
                                doc="Write the per-image mode maps (False keeps only the reducers' states and the "
                                    "attention maps).")

    keep_inputs: bool = _option(False, doc="Keep every layer's captured tokens to the batch's end (switched on anyway "
                                           "when a reducer needs them and does not take them in the layer hooks).")

    checkpoint_every: int = _option(8, "batches between checkpoints of the reducers' states: a resume after Ctrl-C or "
                                       "a crash redoes at most this many (default 8)", flag="--checkpoint-every",
                                    type=int, metavar="N",
                                    doc="Batches between checkpoints of the reducers' states (a resume redoes at "
                                        "most this many).")

    extra_config: Mapping[str, Any] | None = _option(None, config="extra",
                                                     doc="More settings that define the run's content (e.g. an "
                                                         "analysis's), stored in the run config, so that a resume "
                                                         "with other ones is refused before the file is touched.")

    def __post_init__(self) -> None:
        if isinstance(self.layers, (list, range)):  # frozen all the way down: a list could change after the check
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.attention, list):
            object.__setattr__(self, "attention", tuple(self.attention))

    # ------------------------------------------------------------------------------------------ the CLI
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
        """Add the ``qkhooks record`` flag of every option that has one (defaults: the fields'), or of the options
        ``names`` only (another command that records a dataset, e.g. ``qkhooks bfd``, takes the same flags)."""
        unknown = sorted(set(names or ()) - {f.name for f in dataclasses.fields(cls) if f.metadata["flag"]})
        if unknown:
            raise ValueError(f"no flag of RecordOptions is named {unknown}")
        for f in dataclasses.fields(cls):
            if f.metadata["flag"] and (names is None or f.name in names):
                parser.add_argument(f.metadata["flag"], dest=f.name, default=f.default, help=f.metadata["help"],
                                    **f.metadata["argparse"])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RecordOptions:
        """The options of parsed ``qkhooks record`` flags (those :meth:`add_arguments` added)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.metadata["flag"]})

    # ------------------------------------------------------------------------------------------ the API
    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_keywords(cls, options: RecordOptions | None, **keywords: Any) -> RecordOptions:
        """``options`` if given (then every keyword must still be at its default: one source for each call), else
        the options the keywords spell."""
        if options is None:
            return cls(**keywords)
        defaults = cls()
        both = [name for name, value in keywords.items() if value != getattr(defaults, name)]
        if both:
            raise QKHooksError(f"{', '.join(both)} given both in options=RecordOptions(...) and as keywords; pass "
                               "each option one way: dataclasses.replace(options, ...) changes some of them.")
        return options

    # ------------------------------------------------------------------------------------------ the run file
    def run_config(self, **facts: Any) -> dict[str, Any]:
        """The run file's ``config``: the options that define the content (with ``modes``, ``layers`` and
        ``attention`` as resolved by the recording) plus the :data:`RUN_FACTS`. A resume must match it exactly."""
        if set(facts) != set(RUN_FACTS):
            raise TypeError(f"run_config needs the facts {RUN_FACTS}, got {sorted(facts)}")
        values = {f.metadata["config"]: _plain(dataclasses.asdict(self)[f.name])
                  for f in dataclasses.fields(self) if f.metadata["config"]}
        return {**values, **facts}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RecordOptions:
        """The content-defining options of a stored run config (the rest at their defaults): recording with them
        again writes the same config."""
        attention = "+".join(spec["kind"] + (":" + ",".join(map(str, spec["layers"])) if spec.get("layers") else "")
                             for spec in config.get("attention") or []) or None
        keys = {f.metadata["config"]: f.name for f in dataclasses.fields(cls) if f.metadata["config"]}
        values = {name: config[key] for key, name in keys.items() if key in config}
        return cls(**{**values, "attention": attention,
                      "layers": None if values.get("layers") is None else tuple(values["layers"])})


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively: the config is compared as JSON."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _document_fields(cls: type) -> None:
    """Append each option, its default and its ``doc`` to ``cls.__doc__``, so ``help(RecordOptions)`` lists them
    (Python keeps no docstring written under a field, and reading them back from the source costs ~10 ms at import)."""
    lines = [f"    {f.name} (default {f.default!r}{', ' + f.metadata['flag'] if f.metadata['flag'] else ''}): "
             f"{f.metadata['doc']}" for f in dataclasses.fields(cls)]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Options:\n" + "\n".join(lines) + "\n"


_document_fields(RecordOptions)
