"""The user's own data: torch Datasets, iterables, DataLoaders, Hugging Face datasets and webdataset shards give
the same per-image arrays as a folder of the same images; workers, resume after SIGKILL, bad sources."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm  # noqa: F401  (BUILD is evaluated with it)
import torch
from PIL import Image

import qkhooks
from qkhooks import QKHooksError
from qkhooks.cli import main as cli_main
from qkhooks.data import open_source
from qkhooks.store import open_run
from qkhooks.store.format import FILE_HASHES, FILE_MTIMES, FILE_SIZES
from qkhooks.stream import record_dataset

datasets = pytest.importorskip("datasets")

BUILD = "timm.create_model('vit_small_patch16_224', pretrained=False, patch_size=32, embed_dim=32, depth=2, num_heads=4)"
SIZES = [(40, 56), (64, 48), (50, 50), (33, 70), (72, 40), (45, 60), (60, 45)]


def tiny_vit() -> qkhooks.LoadedModel:
    torch.manual_seed(0)
    return qkhooks.load_model(eval(BUILD).eval())


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Small random PNGs of different sizes (so resize and crop both apply), named so sorted order is n order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_shards(paths: list[Path], pattern: str, per_shard: int, extra: dict[str, dict[str, bytes]] | None = None) -> None:
    """webdataset layout: <key>.png (+ side files) per sample, samples in order over shards of ``per_shard``."""
    for s in range(0, len(paths), per_shard):
        with tarfile.open(pattern.format(s // per_shard), "w") as tar:
            for path in paths[s : s + per_shard]:
                members = {path.name: path.read_bytes(), **(extra or {}).get(path.stem, {})}
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def hf_dataset(paths: list[Path], **columns) -> "datasets.Dataset":
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "id": [p.name for p in paths], **columns})
    return ds.cast_column("image", datasets.Image())


class PilDataset(torch.utils.data.Dataset):
    """What a user writes: items are dicts with a PIL image and an id."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return {"image": Image.open(self.paths[i]), "id": self.paths[i].name}


def record(data, out: Path, **kw):
    opts = dict(modes=8, layers="0,1", dtype="float32", batch_size=2, reducers=[], progress=False)
    return record_dataset(tiny_vit(), data, out, **{**opts, **kw})


def contents(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    with open_run(path) as run:
        return run.ids, {name: run.array(name)[:] for name in run.arrays()}


def assert_same_run(a: Path, b: Path) -> None:
    """The same ids and recorded arrays. Each image file's size and modification time
    (:data:`qkhooks.store.format.FILE_SIZES`, ``FILE_MTIMES``, ``FILE_HASHES``, checked against ``os.stat`` in test_store_file_sizes.py and
    test_spectrum_edits_and_dataparallel.py) are kept only by runs of sources read from files, so they are left out."""
    ids_a, arrays_a = contents(a)
    ids_b, arrays_b = contents(b)
    assert ids_a == ids_b
    for arrays in (arrays_a, arrays_b):
        arrays.pop(FILE_SIZES, None)
        arrays.pop(FILE_MTIMES, None)
        arrays.pop(FILE_HASHES, None)
    assert arrays_a.keys() == arrays_b.keys() and arrays_a
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


def test_every_container_gives_the_folders_arrays_and_ids(tmp_path):
    paths = write_images(tmp_path / "folder", 5)
    ds = hf_dataset(paths)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    write_shards(paths, str(tmp_path / "part-{}.tar"), per_shard=3)
    folder = tmp_path / "folder.h5"
    record(str(tmp_path / "folder"), folder)

    # the folder run is the model's own forward on the folder's images (an independent reference)
    loaded = tiny_vit()
    pixels = torch.stack([loaded.image_config(Image.open(p).convert("RGB")) for p in paths])
    with qkhooks.record(loaded.model, modes=8, layers=[0, 1]) as run, torch.no_grad():
        loaded.model(pixels)
    ids, arrays = contents(folder)
    assert ids == [p.name for p in paths]
    assert arrays.pop(FILE_SIZES).tolist() == [p.stat().st_size for p in paths]  # kept for sources read from files
    assert arrays.pop(FILE_MTIMES).tolist() == [p.stat().st_mtime_ns for p in paths]
    blake = [int.from_bytes(hashlib.blake2b(p.read_bytes(), digest_size=8).digest(), "little", signed=True) for p in paths]
    assert arrays.pop(FILE_HASHES).tolist() == blake
    for name, value in run.last.arrays().items():
        np.testing.assert_array_equal(arrays[name], value.numpy(), err_msg=name)

    sources = {
        "torch": PilDataset(paths),
        "hf": ds,
        "hf_iterable": ds.to_iterable_dataset(),
        "hfds": f"hfds:{tmp_path / 'hf'}:train",
        "imagefolder": f"hfds:{tmp_path / 'folder'}",  # read by datasets' imagefolder; ids: the relative paths
        "wds": f"wds:{tmp_path}/part-{{0..1}}.tar",
        "loader": torch.utils.data.DataLoader(PilDataset(paths), batch_size=4, collate_fn=list),
    }
    if importlib.util.find_spec("webdataset"):  # the package's own reader, undecoded samples: read in order too
        import webdataset

        sources["webdataset"] = webdataset.WebDataset([str(tmp_path / f"part-{i}.tar") for i in (0, 1)],
                                                      shardshuffle=False)
    for name, data in sources.items():
        out = tmp_path / f"{name}.h5"
        result = record(data, out)
        assert result.images == 5, name
        assert_same_run(folder, out)

    # without ids, a source's ids are the positions: a list of PIL images, a generator of HWC uint8 arrays
    unnamed = {"list": [Image.open(p) for p in paths], "generator": (np.array(Image.open(p)) for p in paths)}
    for name, data in unnamed.items():
        record(data, tmp_path / f"{name}.h5")
        ids_list, arrays_list = contents(tmp_path / f"{name}.h5")
        assert ids_list == [str(i) for i in range(5)]
        for key in arrays:
            np.testing.assert_array_equal(arrays_list[key], arrays[key], err_msg=key)


class WorkerSharded(torch.utils.data.IterableDataset):
    """An IterableDataset that splits itself over DataLoader workers, as many users' do."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        step, first = (1, 0) if info is None else (info.num_workers, info.id)
        for path in self.paths[first::step]:
            yield {"image": path.read_bytes(), "id": path.name}


def test_two_workers_record_every_image_once_in_the_source_order(tmp_path):
    paths = write_images(tmp_path / "folder", 7)
    write_shards(paths, str(tmp_path / "s{}.tar"), per_shard=3)
    spec = f"wds:{tmp_path}/s{{0..2}}.tar"
    record(spec, tmp_path / "one.h5")
    code = cli_main(["record", "timm:vit_small_patch16_224", spec, "--random-init", "--out",
                    str(tmp_path / "cli.h5"), "--workers", "2", "--batch-size", "2", "--layers", "0"])
    assert code == 0
    with open_run(tmp_path / "cli.h5") as run:
        assert run.ids == [p.name for p in paths]  # each once, none missing, in order
    record(spec, tmp_path / "two.h5", num_workers=2)
    assert_same_run(tmp_path / "one.h5", tmp_path / "two.h5")
    record(WorkerSharded(paths), tmp_path / "iter.h5", num_workers=2)
    assert_same_run(tmp_path / "one.h5", tmp_path / "iter.h5")
    # where workers are spawned rather than forked (macOS, Windows) the stream is pickled for them: a generator's
    # stream travels without its rows and decodes there as here
    stream = open_source((p.read_bytes() for p in paths), tiny_vit().image_config)
    rows = list(stream._reader.rows(0))
    copy = pickle.loads(pickle.dumps(stream))
    items, failures = copy._decode_batch(list(enumerate(rows)))
    assert not failures and len(items) == 7
    for item, (position, row) in zip(items, enumerate(rows)):
        assert torch.equal(item["pixel_values"], stream._decode(position, row)["pixel_values"])


CHILD = textwrap.dedent(
    """
    import os, signal, sys, timm, torch, datasets, qkhooks
    from qkhooks.stream import record_dataset
    torch.manual_seed(0)
    loaded = qkhooks.load_model({build}.eval())
    batches = []
    def die(batch):
        batches.append(1)
        if len(batches) == 7:
            os.kill(os.getpid(), signal.SIGKILL)
    data = datasets.load_from_disk(sys.argv[2]).to_iterable_dataset()
    record_dataset(loaded, data, sys.argv[1], modes=8, layers="0,1", dtype="float32", batch_size=2,
                   progress=False, checkpoint_every=3, on_batch=die)
    """
)


def test_an_iterable_source_killed_mid_run_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    from qkhooks.data import readers

    paths = write_images(tmp_path / "folder", 24)
    hf_dataset(paths).save_to_disk(str(tmp_path / "hf"))
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(build=BUILD))
    killed = tmp_path / "killed.h5"
    child = subprocess.run([sys.executable, str(script), str(killed), str(tmp_path / "hf")], capture_output=True,
                           timeout=600, env={**os.environ, "PYTHONPATH": str(Path(qkhooks.__file__).parents[1])})
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    with open_run(killed) as run:
        assert not run.complete and run.n >= 12

    decoded: list[int] = []
    real = readers.read_oriented
    monkeypatch.setattr(readers, "read_oriented", lambda f: decoded.append(1) or real(f))
    opts = dict(modes=8, layers="0,1", dtype="float32", batch_size=2, progress=False, checkpoint_every=3)
    data = datasets.load_from_disk(str(tmp_path / "hf")).to_iterable_dataset()
    resumed = record_dataset(tiny_vit(), data, killed, resume=True, **opts)
    assert resumed.images == 24
    # the newest checkpoint on disk (after batch 3 or 6: the writer may not have flushed the later one) says where
    # to continue; the items before are skipped undecoded (plus one decode: the first item, read when the source
    # is opened to learn whether it has masks)
    said = re.search(r"resuming the stream at item (\d+): (\d+) images are in the file; the \d+ items before are "
                     r"skipped without decoding", capsys.readouterr().err)
    assert said and said.group(1) == said.group(2) and int(said.group(1)) in (6, 12)
    assert len(decoded) == 1 + 24 - int(said.group(1))
    record_dataset(tiny_vit(), data, tmp_path / "clean.h5", **opts)
    assert_same_run(tmp_path / "clean.h5", killed)
    with open_run(killed) as a, open_run(tmp_path / "clean.h5") as b:
        assert a.complete and len(set(a.ids)) == 24
        for name in ("topk_modes", "anisotropy", "source_position"):
            sa, sb = a.state(name), b.state(name)
            assert sa is not None and sa.keys() == sb.keys()
            for key in sa:
                if isinstance(sa[key], str):
                    assert sa[key] == sb[key], f"{name}/{key}"
                else:
                    np.testing.assert_allclose(sa[key], sb[key], rtol=1e-12, err_msg=f"{name}/{key}")


def instance_masks(paths: list[Path]) -> list[np.ndarray]:
    """Three rectangles per image, labelled 1..3 (0 = background)."""
    masks = []
    for path in paths:
        w, h = Image.open(path).size
        m = np.zeros((h, w), np.uint8)
        m[: h // 2, : w // 2], m[h // 2 :, : w // 3], m[h // 3 :, w // 2 :] = 1, 2, 3
        masks.append(m)
    return masks


def test_same_object_statistics_of_a_hf_mask_column_equal_the_folder_layout(tmp_path):
    from qkhooks.analysis.modes import analyze_modes

    root = tmp_path / "ade"
    paths = write_images(root / "images" / "training", 6)
    masks = instance_masks(paths)
    (root / "annotations_instance" / "training").mkdir(parents=True)
    mask_files = []
    for path, m in zip(paths, masks):
        rgb = np.stack([np.where(m > 0, 5, 0), m, np.zeros_like(m)], -1).astype(np.uint8)  # R class, G instance
        Image.fromarray(rgb).save(root / "annotations_instance" / "training" / path.name)
        mask_files.append(io.BytesIO())
        Image.fromarray(m).save(mask_files[-1], format="PNG")
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "image_id": [f"training/{p.name}" for p in paths],
                                     "instance_mask": [{"bytes": f.getvalue(), "path": None} for f in mask_files]})
    ds = ds.cast_column("image", datasets.Image()).cast_column("instance_mask", datasets.Image())
    opts = dict(modes=4, layers="0,1", batch_size=3, progress=False)
    record_dataset(tiny_vit(), f"ade20k:{root}", tmp_path / "folder.h5", **opts)
    record_dataset(tiny_vit(), ds, tmp_path / "hf.h5", masks={"objects": "instance_mask"}, **opts)
    assert_same_run(tmp_path / "folder.h5", tmp_path / "hf.h5")
    with open_run(tmp_path / "hf.h5") as run:
        assert len(np.unique(run.array("masks/objects")[:])) == 4  # the masks arrived: background and 3 objects
    same = [analyze_modes(tmp_path / f"{name}.h5", tmp_path / name, figure_modes=0, overview=False,
                          images=False)["same_object"] for name in ("folder", "hf")]
    assert same[0] and same[0] == same[1]


def test_corrupt_bytes_inside_a_shard_are_skipped_and_listed(tmp_path):
    paths = write_images(tmp_path / "folder", 4)
    (tmp_path / "folder" / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    write_shards(paths, str(tmp_path / "p{}.tar"), per_shard=4,
                 extra={"img02": {"img02.json": json.dumps({"id": "two"}).encode(), "img02.cls": b"7"}})
    with pytest.warns(UserWarning, match="img01.png"):
        result = record(f"wds:{tmp_path}/p0.tar", tmp_path / "run.h5")
    assert result.images == 3
    with open_run(tmp_path / "run.h5") as run:
        assert run.ids == ["img00.png", "two", "img03.png"]  # a .json side file names the id
        assert [s[0] for s in run.skipped] == ["img01.png"] and "Error" in run.skipped[0][1]


def test_a_truncated_shard_keeps_what_it_holds_and_the_next_shard_goes_on(tmp_path):
    paths = write_images(tmp_path / "folder", 6)
    write_shards(paths, str(tmp_path / "p{}.tar"), per_shard=3)
    first = tmp_path / "p0.tar"
    offsets = {}
    with tarfile.open(first) as tar:
        offsets = {m.name: m.offset_data for m in tar.getmembers()}
    first.write_bytes(first.read_bytes()[: offsets["img01.png"] + 100])  # cut inside the second image
    with pytest.warns(UserWarning, match="unreadable"):
        result = record(f"wds:{tmp_path}/p{{0..1}}.tar", tmp_path / "run.h5")
    assert result.images == 4
    with open_run(tmp_path / "run.h5") as run:
        assert run.ids == ["img00.png", "img03.png", "img04.png", "img05.png"]
        assert [s[0] for s in run.skipped] == [str(first)] and "rest of the shard after 'img00'" in run.skipped[0][1]


def test_bad_sources_are_refused_with_the_reason(tmp_path, monkeypatch):
    cfg = tiny_vit().image_config
    paths = write_images(tmp_path / "folder", 2)
    with pytest.raises(QKHooksError, match="has no image: its keys are \\['label'\\]"):
        record([{"label": 1}], tmp_path / "a.h5")
    assert not (tmp_path / "a.h5").exists()
    with pytest.raises(QKHooksError, match="'picture' is not in the dataset; its columns are \\['image', 'id'\\]"):
        open_source(hf_dataset(paths), cfg, image_column="picture")
    with pytest.raises(QKHooksError, match="empty"):
        open_source(iter([]), cfg)
    with pytest.raises(QKHooksError, match="empty"):
        open_source(torch.utils.data.TensorDataset(torch.zeros(0)), cfg)
    to_tensor = [{"image": torch.rand(3, 8, 8)}]
    with pytest.raises(QKHooksError, match="already a tensor .* model's own preprocessing"):
        open_source(torch.utils.data.DataLoader(to_tensor), cfg)
    with pytest.raises(QKHooksError, match="holds the splits \\['train'\\]; pass one"):
        open_source(datasets.DatasetDict({"train": hf_dataset(paths)}), cfg)
    with pytest.raises(QKHooksError, match="uint8"):
        open_source([np.zeros((8, 8, 3), np.float32)], cfg)
    with pytest.raises(QKHooksError, match="shards do not exist"):
        open_source(f"wds:{tmp_path}/none-{{0..3}}.tar", cfg)
    with pytest.raises(QKHooksError, match="does not exist"):
        open_source(f"hfds:{tmp_path}/nothing", cfg)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    with pytest.raises(QKHooksError, match=r"pip install 'qkhooks\[datasets\]'"):
        open_source(f"hfds:{tmp_path}/folder", cfg)


def test_brace_patterns_expand_like_webdataset():
    from qkhooks.data.sources import expand_braces

    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/p{8..10}.tar") == ["x/p8.tar", "x/p9.tar", "x/p10.tar", "y/p8.tar", "y/p9.tar", "y/p10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_bfd_takes_the_users_data_like_a_folder(tmp_path):
    from qkhooks.analysis.bfd import run_bfd

    paths = write_images(tmp_path / "folder", 6)
    opts = dict(layers="0,1", batch_size=4, holdout_every=3)
    folder = run_bfd(tiny_vit(), str(tmp_path / "folder"), **opts)
    streamed = run_bfd(tiny_vit(), hf_dataset(paths).to_iterable_dataset(), **opts)
    assert json.dumps(folder, sort_keys=True, default=str) == json.dumps(streamed, sort_keys=True, default=str)


def test_an_error_in_the_users_own_dataset_stops_the_run_and_says_where(tmp_path):
    paths = write_images(tmp_path / "folder", 3)

    class Broken(PilDataset):
        def __getitem__(self, i):
            if i == 2:
                raise KeyError("label missing")
            return super().__getitem__(i)

    with pytest.raises(KeyError) as caught:
        record(Broken(paths), tmp_path / "run.h5")
    assert "item 2 of torch:Broken" in "".join(caught.value.__notes__)


def test_image_label_pairs_keep_their_image_and_a_pair_that_would_drop_a_mask_is_refused(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    record([(image, 3), (image, "cat")], tmp_path / "pairs.h5")
    record([image, image], tmp_path / "plain.h5")
    (_, pairs), (_, plain) = contents(tmp_path / "pairs.h5"), contents(tmp_path / "plain.h5")
    assert pairs.keys() == plain.keys() and pairs
    for name in plain:
        np.testing.assert_array_equal(pairs[name], plain[name], err_msg=name)
    with pytest.raises(QKHooksError, match=r"read as \(image, label\).*give masks in a dict"):
        open_source([(image, np.ones((40, 48), np.int64))], tiny_vit().image_config)
