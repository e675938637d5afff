"""Datasets with object masks read from disk or generated: ADE20K (both layouts) and the odd-one-out (O3)
displays, generated or from the O3 dataset's folders."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from qkhooks.data.items import (
    ImageDataset,
    check_mask_file,
    list_images,
    mask_as_shown,
    RawItem,
    read_mask_file,
    read_photo,
    ItemRecord,
    shown_frame,
)
from qkhooks.data.preprocess import ImageConfig
from qkhooks.data.stimuli import make_o3
from qkhooks.data.masks import refuse_overlap
from qkhooks.errors import DataRefusal, QKHooksError


def _one_file_per_name(folder: Path, rels: list[str], why: str) -> None:
    """Refuse files of ``folder`` whose names differ only by their extension (``x.jpg`` and ``x.png``): a partner file
    is found by the name without it, so both would take the same one (``why`` says which), and one image's masks or
    annotation would be recorded for the other without a word (review r35 B)."""
    by_name: dict[str, list[str]] = {}
    for rel in rels:
        by_name.setdefault(str(Path(rel).with_suffix("")), []).append(rel)
    clashes = [files for files in by_name.values() if len(files) > 1]
    if clashes:
        shown = "; ".join(" and ".join(files) for files in clashes[:5])
        raise QKHooksError(f"{str(folder)!r}: {len(clashes)} file name(s) differ only by their extension ({shown}), "
                           f"so {why}. Rename or remove one of each.")


def _files_by_name(folder: Path, extension: str) -> dict[str, list[Path]]:
    """The files under ``folder`` (recursively, hidden ones ignored, as a folder's photos are found) whose extension
    is ``extension`` in any letter case (photos match ``.JPG`` like ``.jpg``, so partner files match ``.PNG`` like
    ``.png`` on every file system), by their posix path relative to ``folder`` without the extension."""
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() == extension:
                path = Path(dirpath, name)
                found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    return found


def _the_one(files: list[Path], of: Path, what: str) -> Path:
    """The one ``what`` file (annotation, image) of ``of`` among ``files`` (:func:`_files_by_name`'s list), refused
    where two differ only by the extension's letter case: which of them belongs to it is not known."""
    if len(files) > 1:
        raise QKHooksError(f"{of}: {len(files)} {what} files differ only by their extension's letter case "
                           f"({' and '.join(str(f) for f in files)}), so which of them is its {what} is not known. "
                           "Rename or remove one of them.")
    return files[0]


def _layout_root(spec_dir: str, what: str, layout: str) -> Path:
    """The folder of an annotated dataset spec (``~`` expanded, made absolute as folder datasets are: a change of
    working directory after opening must not load another folder's files), refused when it is not a folder."""
    root = Path(spec_dir).expanduser()
    if not root.is_dir():
        raise QKHooksError(f"{what} folder {str(root)!r} does not exist; expected {layout}.")
    return root.absolute()


# ------------------------------------------------------------------------------------------ ADE20K


def _renumber(keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Map the distinct ``keys`` at ``valid`` pixels to ids 1..M in ascending key order; 0 elsewhere."""
    out = np.zeros(keys.shape, dtype=np.int32)
    if valid.any():
        _, inverse = np.unique(keys[valid], return_inverse=True)
        out[valid] = inverse.reshape(-1) + 1
    return out


def _ade_item(image: str, annotation: str, labels: np.ndarray, tagged: bool) -> RawItem:
    """The photo and its label map in the frame of the photo as shown (README: masks beside EXIF-rotated photos)."""
    photo, orientation = read_photo(image, "ADE20K image")
    objects = mask_as_shown(labels, orientation, (photo.height, photo.width),
                             f"ADE20K image {image}", "objects", tagged, annotation)
    return RawItem(image=photo, objects=objects)


def _load_ade_classes(image: str, annotation: str) -> RawItem:
    """ADEChallengeData2016 class map (0 = other): each class present becomes one object (segments, not instances)."""
    classes, tagged = read_mask_file(annotation, f"ADE20K image {image}", "objects")
    if classes.ndim != 2:
        raise QKHooksError(f"ADE20K annotation {annotation} is not a single-channel class map.")
    return _ade_item(image, annotation, _renumber(classes, classes > 0), tagged)


def _load_ade_instances(image: str, annotation: str) -> RawItem:
    """Places-challenge ``annotations_instance`` PNG: R = category, G = instance id (0 = none)."""
    rgb, tagged = read_mask_file(annotation, f"ADE20K image {image}", "objects", "RGB")
    inst = rgb[:, :, 1]
    return _ade_item(image, annotation, _renumber(inst, inst > 0), tagged)


def _load_ade_full(image: str, seg: str) -> RawItem:
    """Full ADE20K ``*_seg.png``: class = R // 10 * 256 + G (0 = unlabelled), instance = distinct B values."""
    rgb, tagged = read_mask_file(seg, f"ADE20K image {image}", "objects", "RGB")
    rgb = rgb.astype(np.int32)
    classes = rgb[:, :, 0] // 10 * 256 + rgb[:, :, 1]
    return _ade_item(image, seg, _renumber(rgb[:, :, 2], classes > 0), tagged)


_ADE_LAYOUTS = (
    "ADEChallengeData2016 (DIR/images/<split>/*.jpg with DIR/annotations/<split>/*.png class maps, or "
    "DIR/annotations_instance/<split>/*.png with R = class and G = instance; DIR may also be one "
    "DIR/images/<split> folder) or full ADE20K (*.jpg next to *_seg.png anywhere under DIR)"
)


def _check_ade_frames(records: list[ItemRecord], annotations: dict[str, str]) -> None:
    """Open-time check that each annotation fits its photo's frame where the photo has an EXIF orientation, so that a
    mask whose frame cannot be told is refused before anything is recorded; reads the photos' headers only (a
    JPEG's EXIF), and an annotation only when its photo is rotated."""
    for record in records:
        photo = str(record.path)
        orientation, shown = shown_frame(photo, "ADE20K image")
        if orientation != 1:
            check_mask_file(annotations[record.id], orientation, shown, f"ADE20K image {photo}", "objects")


def open_ade20k(spec_dir: str, cfg: ImageConfig, limit: int | None) -> ImageDataset:
    root = _layout_root(spec_dir, "ADE20K", _ADE_LAYOUTS)
    base, splits = None, None
    if (root / "images").is_dir() and any((root / a).is_dir() for a in ("annotations", "annotations_instance")):
        base = root
        splits = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    elif root.parent.name == "images" and any(
        (root.parent.parent / a / root.name).is_dir() for a in ("annotations", "annotations_instance")
    ):
        base, splits = root.parent.parent, [root.name]

    records: list[ItemRecord] = []
    annotations: dict[str, str] = {}  # id -> its annotation file
    skipped: list[tuple[str, str]] = []
    if base is not None:
        for split in splits or []:
            inst_dir = base / "annotations_instance" / split
            cls_dir = base / "annotations" / split
            if inst_dir.is_dir():
                ann_dir, loader = inst_dir, _load_ade_instances
            elif cls_dir.is_dir():
                ann_dir, loader = cls_dir, _load_ade_classes
            else:
                continue  # e.g. images/testing has no annotations
            img_dir = base / "images" / split
            rels = list_images(img_dir)
            _one_file_per_name(img_dir, rels, f"each pair would be recorded with the same annotation in {ann_dir}")
            pngs = _files_by_name(ann_dir, ".png")
            for rel in rels:
                image, item_id, name = img_dir / rel, f"{split}/{rel}", Path(rel).with_suffix("").as_posix()
                if name not in pngs:
                    skipped.append((item_id, f"no annotation {ann_dir / name}.png"))
                    continue
                ann = _the_one(pngs[name], image, "annotation")
                load = functools.partial(loader, str(image), str(ann))
                records.append(ItemRecord(id=item_id, load=load, path=str(image)))
                annotations[item_id] = str(ann)
    else:
        pngs, jpgs = _files_by_name(root, ".png"), _files_by_name(root, ".jpg")
        for name in sorted(n for n in pngs if n.endswith("_seg")):
            seg = _the_one(pngs[name], root / name, "_seg.png")
            if name[: -len("_seg")] not in jpgs:
                skipped.append((seg.relative_to(root).as_posix(),
                                f"no image {Path(name[: -len('_seg')]).name}.jpg next to it"))
                continue
            image = _the_one(jpgs[name[: -len("_seg")]], seg, "image")
            rel = image.relative_to(root).as_posix()
            load = functools.partial(_load_ade_full, str(image), str(seg))
            records.append(ItemRecord(id=rel, load=load, path=str(image)))
            annotations[rel] = str(seg)
        records.sort(key=lambda r: r.id)
    if skipped:
        warnings.warn(
            f"ADE20K: {len(skipped)} files without a partner were left out (first: {skipped[0][0]}: {skipped[0][1]}); "
            "see dataset.skipped",
            stacklevel=3,
        )
    if not records:
        raise QKHooksError(f"no annotated ADE20K images found under {str(root)!r}; expected {_ADE_LAYOUTS}.")
    records = records[:limit] if limit else records
    _check_ade_frames(records, annotations)
    return ImageDataset(f"ade20k:{root}", records, cfg, has_masks=True, skipped=skipped)


# ---------------------------------------------------------------------------------------------- O3


def o3_item(raw_masks: tuple[np.ndarray, np.ndarray], image: Image.Image, native: bool, where: str) -> RawItem:
    """Target/distractor boolean masks to the O3 item fields (distractors split into connected components); masks
    that overlap are refused here, on the source's own pixels, naming the item (``where``)."""
    target, distractor = raw_masks
    refuse_overlap(target[None], distractor[None], [where], "pixels", error=DataRefusal)
    try:
        from scipy import ndimage
    except ImportError:
        raise QKHooksError("splitting O3 distractor masks into items needs scipy; pip install scipy.") from None
    items, _ = ndimage.label(distractor, structure=np.ones((3, 3), dtype=bool))
    items = items.astype(np.int32)
    objects = np.where(items > 0, items + 1, 0).astype(np.int32)
    objects[target] = 1
    return RawItem(
        image=image,
        objects=objects,
        target=target.astype(np.float32),
        distractor=distractor.astype(np.float32),
        distractor_items=items,
        native=native,
    )


def _load_o3_generated(seed: int, index: int, size: tuple[int, int]) -> RawItem:
    stim = make_o3(seed, index, size)
    return RawItem(
        image=stim.image,
        objects=stim.objects,
        target=stim.target.astype(np.float32),
        distractor=stim.distractor.astype(np.float32),
        distractor_items=stim.distractor_items,
        native=True,
        extras={"feature": stim.feature},
    )


def _parse_o3(rest: str) -> tuple[int, int]:
    parts = rest.split(":")
    try:
        if not 1 <= len(parts) <= 2:
            raise ValueError
        n = int(parts[0])
        seed = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise QKHooksError(f"cannot read 'o3:{rest}'; write o3:N or o3:N:SEED with integers, e.g. o3:64:0.") from None
    if n < 1 or seed < 0:
        raise QKHooksError(f"'o3:{rest}' needs N >= 1 and SEED >= 0, e.g. o3:64:0.")
    return n, seed


def open_o3(rest: str, cfg: ImageConfig, limit: int | None) -> ImageDataset:
    n, seed = _parse_o3(rest)
    count = n if limit is None else min(n, limit)
    records = [
        ItemRecord(id=f"o3/{seed}/{i}", load=functools.partial(_load_o3_generated, seed, i, cfg.size))
        for i in range(count)
    ]
    return ImageDataset(f"o3:{n}:{seed}", records, cfg, has_masks=True, has_targets=True)


def _read_binary_mask(path: str, image: str, key: str) -> tuple[np.ndarray, bool]:
    """O3 masks are greyscale, white = object; JPEG compression noise is removed by thresholding at 128 (a 16-bit
    mask's levels scaled by their range first: :func:`~qkhooks.data.items.mask_pixels`). Also
    whether the file carried an orientation tag of its own (then applied)."""
    grey, tagged = read_mask_file(path, f"O3 image {image}", key, "L")
    return grey >= 128, tagged


def _load_o3_file(image: str, target: str, distractor: str) -> RawItem:
    photo, orientation = read_photo(image, "O3 image")
    shown = (photo.height, photo.width)
    masks = []
    for key, path in (("target", target), ("distractor", distractor)):
        mask, tagged = _read_binary_mask(path, image, key)
        masks.append(mask_as_shown(mask, orientation, shown, f"O3 image {image}", key, tagged, path))
    return o3_item((masks[0], masks[1]), photo, native=False, where=f"O3 image {image}")


def _o3_sizes(img: Path, masks: dict[str, Path], root: Path) -> None:
    """Open-time check that an O3 image's masks fit it (in the photo's stored or shown frame, README: masks beside
    EXIF-rotated photos), so that a misfit is refused before anything is recorded."""
    orientation, shown = shown_frame(img, "O3 image")
    sizes = {img: shown}
    for key, path in masks.items():
        mask_hw = check_mask_file(path, orientation, shown, f"O3 image {img}", key)
        if mask_hw is not None:
            sizes[path] = mask_hw
    if len(set(sizes.values())) != 1:
        rel = img.relative_to(root / "images").as_posix()
        raise QKHooksError(
            f"O3 files for {rel!r} differ in size: "
            + ", ".join(f"{p.relative_to(root).as_posix()} {s[0]}x{s[1]}" for p, s in sizes.items())
            + "; image and masks must have the same size."
        )


_O3_LAYOUT = (
    "DIR/images/<name>.<ext>, DIR/targ_images/<name>.<ext> and DIR/dist_images/<name>.<ext> "
    "(greyscale masks, white = target / distractors, same size as the image; layout of the O3 release "
    "as read by ykotseruba/P3O3_metrics)"
)


def open_o3dir(spec_dir: str, cfg: ImageConfig, limit: int | None) -> ImageDataset:
    root = _layout_root(spec_dir, "O3", _O3_LAYOUT)
    missing = [d for d in ("images", "targ_images", "dist_images") if not (root / d).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise QKHooksError(
            f"{str(root)!r} is not an O3 folder: missing {', '.join(d + '/' for d in missing)} "
            f"(found folders: {present or 'none'}). "
            f"Expected {_O3_LAYOUT}."
        )
    images = list_images(root / "images")
    if not images:
        raise QKHooksError(f"no images in {str(root / 'images')!r}; expected {_O3_LAYOUT}.")

    _one_file_per_name(root / "images", images, "each pair would be recorded with the same target and distractor masks")

    def by_stem(folder: Path) -> dict[str, Path]:
        rels = list_images(folder)
        _one_file_per_name(folder, rels, "which of them is an image's mask is not known")
        return {str(Path(rel).with_suffix("")): folder / rel for rel in rels}

    targets, distractors = by_stem(root / "targ_images"), by_stem(root / "dist_images")
    unmatched: list[tuple[str, list[str]]] = []
    for rel in images:
        stem = str(Path(rel).with_suffix(""))
        lack = [d for d, table in (("targ_images", targets), ("dist_images", distractors)) if stem not in table]
        if lack:
            unmatched.append((rel, lack))
    if unmatched:
        shown = "; ".join(f"{rel} (no {' or '.join(lack)} file)" for rel, lack in unmatched[:5])
        raise QKHooksError(
            f"O3 folder {str(root)!r}: {len(unmatched)} of {len(images)} images have no matching mask: {shown}. "
            f"Expected {_O3_LAYOUT}."
        )
    records: list[ItemRecord] = []
    for rel in images[:limit] if limit else images:
        stem = str(Path(rel).with_suffix(""))
        img, tgt, dst = root / "images" / rel, targets[stem], distractors[stem]
        _o3_sizes(img, {"target": tgt, "distractor": dst}, root)
        records.append(ItemRecord(id=rel, load=functools.partial(_load_o3_file, str(img), str(tgt), str(dst)),
                               path=str(img)))
    return ImageDataset(f"o3dir:{root}", records, cfg, has_masks=True, has_targets=True)
