"""Round 41: the stamp of a file its record's loader reads otherwise than through ``read_oriented``, the path-naming of
PIL's "cannot identify" in both stamped reads, and ``ImageDataset.file_of`` / ``files``."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from qkhooks.data import ImageConfig, open_dataset
from qkhooks.data.items import NO_STAMP, ImageDataset, ItemRecord, RawItem, bytes_hash, read_oriented, stamps_read
from qkhooks.data_files import file_sizes
from qkhooks.stream import _Stamped

CFG = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)


def _photo(path, seed: int = 0) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return str(path)


def _read_by_pil(path: str, then=None) -> RawItem:
    """A loader that opens the file itself (not through read_oriented), as a user's own record could."""
    with Image.open(path) as im:
        item = RawItem(image=im.convert("RGB"))
    if then is not None:
        then(path)
    return item


def _dataset(records) -> ImageDataset:
    return ImageDataset("own", records, CFG, has_masks=False)


def test_a_file_read_otherwise_is_stamped_from_one_more_read_of_it(tmp_path):
    path = _photo(tmp_path / "a.png")
    item = _Stamped(_dataset([ItemRecord(id="a", load=lambda: _read_by_pil(path), path=path)]))[0]
    data = open(path, "rb").read()
    assert item["file_stamp"] == (len(data), os.stat(path).st_mtime_ns, bytes_hash(data))


def test_a_file_gone_after_it_was_read_otherwise_gets_no_stamp(tmp_path):
    path = _photo(tmp_path / "a.png")
    item = _Stamped(_dataset([ItemRecord(id="a", load=lambda: _read_by_pil(path, then=os.remove), path=path)]))[0]
    assert item["file_stamp"] == NO_STAMP


def test_an_item_not_read_from_a_file_has_no_stamp_and_no_file():
    image = np.zeros((40, 48, 3), np.uint8)
    ds = _dataset([ItemRecord(id="made", load=lambda: RawItem(image=Image.fromarray(image)))])
    assert _Stamped(ds)[0]["file_stamp"] == NO_STAMP
    assert ds.file_of(0) is None and ds.files() == {}


@pytest.mark.parametrize("stamped", [True, False])
def test_a_non_image_is_named_by_its_path_read_stamped_or_not(tmp_path, stamped):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"not an image at all" * 100)
    with pytest.raises(Image.UnidentifiedImageError, match="cannot identify image file") as caught:
        if stamped:
            with stamps_read():
                read_oriented(str(bad))
        else:
            read_oriented(str(bad))
    assert str(caught.value) == f"cannot identify image file {str(bad)!r}"  # as PIL says it of a path


def test_a_folders_files_are_its_items_paths_and_their_sizes_are_read_from_them(tmp_path):
    for n in range(3):
        _photo(tmp_path / f"p{n}.png", seed=n)
    ds = open_dataset(str(tmp_path), CFG)
    files = ds.files()
    assert sorted(files) == sorted(ds.ids) and len(files) == 3
    assert [ds.file_of(i) for i in range(len(ds))] == [files[i] for i in ds.ids]
    assert file_sizes(ds) == {i: os.path.getsize(p) for i, p in files.items()}


# ------------------------------------------------------------------------- a resume with a larger --limit extends a run

_PHOTOS = [f"p{i:02d}.png" for i in range(9)]
_EXT_KW = dict(layers="0", modes=2, batch_size=2, progress=False)


def _per_image(path) -> dict[str, np.ndarray]:
    import h5py

    from qkhooks.store import format as fmt

    with h5py.File(path, "r") as f:
        n = fmt.committed(f)
        arrays = {name: ds[:n] for name, ds in fmt.per_image_datasets(f).items()}
        arrays["ids"] = np.asarray(fmt.read_ids(f, n))
    return arrays


def assert_same_per_image(path, reference, ids) -> None:
    """Two runs hold the same images ``ids`` and the same per-image arrays (floats to the float16 file's rounding)."""
    a, b = _per_image(path), _per_image(reference)
    assert sorted(a) == sorted(b) and list(a["ids"]) == list(ids)
    for name in a:
        if a[name].dtype.kind == "f":
            np.testing.assert_allclose(a[name], b[name], rtol=2e-3, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture
def photos(tmp_path):
    from test_spectrum_edits_and_dataparallel import _same_size_photos

    _same_size_photos(tmp_path / "photos", _PHOTOS, seed=3)
    return tmp_path / "photos"


@pytest.mark.parametrize("checksum", [False, True])
def test_a_resume_with_a_larger_limit_grows_a_finished_run_to_what_one_run_of_that_limit_records(tmp_path, photos,
                                                                                                  checksum):
    """Before: a finished run of --limit 4 could not be taken further ("its config differs ... limit: file 4, now 7");
    a researcher trying a pilot first had to record the pilot's images again."""
    import qkhooks
    from qkhooks.store import verify_run
    from test_spectrum_edits_and_dataparallel import _tiny_loaded

    loaded = _tiny_loaded()
    grown, once = tmp_path / "grown.h5", tmp_path / "once.h5"
    qkhooks.record_dataset(loaded, str(photos), out=grown, limit=4, checksum=checksum, **_EXT_KW)
    result = qkhooks.record_dataset(loaded, str(photos), out=grown, limit=7, checksum=checksum, resume=True, **_EXT_KW)
    qkhooks.record_dataset(loaded, str(photos), out=once, limit=7, checksum=checksum, **_EXT_KW)
    assert result.resumed_from == 4 and result.images == 7
    assert_same_per_image(grown, once, _PHOTOS[:7])
    with qkhooks.open_run(grown) as run, qkhooks.open_run(once) as ref:
        assert run.config == ref.config and run.config["limit"] == 7
        assert run.complete
        for name in run.states():  # the streaming statistics went on from the pilot's: the same as one run's
            state, one = run.state(name), ref.state(name)
            assert sorted(state) == sorted(one) and state.get("images", 7) == one.get("images", 7) == 7
            for key, value in one.items():
                if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                    np.testing.assert_allclose(state[key], value, rtol=1e-4, atol=1e-6, err_msg=f"{name} {key}")
                elif isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(state[key], value, err_msg=f"{name} {key}")
    report = verify_run(grown)
    assert report.ok and report.images == 7, report


def test_a_resume_with_no_limit_grows_a_run_to_all_the_data(tmp_path, photos):
    import qkhooks
    from test_spectrum_edits_and_dataparallel import _tiny_loaded

    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=3, **_EXT_KW)
    qkhooks.record_dataset(loaded, str(photos), out=out, resume=True, **_EXT_KW)
    with qkhooks.open_run(out) as run:
        assert run.ids == _PHOTOS and run.config["limit"] is None


def _as_found(path) -> tuple:
    import h5py

    with h5py.File(path, "r") as f:
        return (dict(f.attrs.items()).get("complete"), f.attrs["config"], list(f["images/ids"][:].astype(str)))


def test_a_smaller_limit_is_refused_and_leaves_the_run_as_it_was(tmp_path, photos):
    import qkhooks
    from test_spectrum_edits_and_dataparallel import _tiny_loaded

    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=5, **_EXT_KW)
    before = _as_found(out)
    with pytest.raises(qkhooks.QKHooksError, match=r"--limit 3: it was recorded with --limit 5 and holds 5 images, more than 3"):
        qkhooks.record_dataset(loaded, str(photos), out=out, limit=3, resume=True, **_EXT_KW)
    assert _as_found(out) == before


def test_a_refused_extension_keeps_the_runs_own_limit(tmp_path, photos):
    """The config is rewritten only once every check of the resume has passed: a kept photo replaced since is refused,
    and the run still says --limit 4 (a later resume with 4 still works once the photo is back)."""
    import qkhooks
    from test_spectrum_edits_and_dataparallel import _tiny_loaded

    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=4, **_EXT_KW)
    before = _as_found(out)
    kept = photos / _PHOTOS[1]
    original = kept.read_bytes()
    kept.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # the same size, other bytes, a new time
    with pytest.raises(qkhooks.QKHooksError, match=_PHOTOS[1]):
        qkhooks.record_dataset(loaded, str(photos), out=out, limit=8, resume=True, **_EXT_KW)
    assert _as_found(out) == before


def test_options_other_than_the_limit_are_still_refused_on_a_larger_limit(tmp_path, photos):
    import qkhooks
    from test_spectrum_edits_and_dataparallel import _tiny_loaded

    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=4, **_EXT_KW)
    with pytest.raises(qkhooks.QKHooksError, match="config differs"):
        qkhooks.record_dataset(loaded, str(photos), out=out, limit=8, resume=True, **{**_EXT_KW, "modes": 3})
    assert json_limit(out) == 4


def json_limit(path) -> int:
    import json

    return json.loads(_as_found(path)[1])["limit"]


# ---------------------------------------------------------------------------------- a Subset of a torchvision folder


def test_a_subset_of_an_image_folder_is_named_and_stamped_by_its_files(tmp_path):
    """Before: ``Subset(ImageFolder(...), indices)``, the way qkhooks' own messages say to record part of a dataset,
    was named '0', '1', ... and stored no file stamps."""
    from torch.utils.data import Subset

    from test_image_folder_ids_and_text_models import _image_folder
    from test_file_stamps import _reference, _stored
    from test_spectrum_edits_and_dataparallel import _tiny_loaded
    import qkhooks

    root, ds = _image_folder(tmp_path)  # cat/c0 cat/c1 dog/d0 dog/d1 dog/d2
    loaded = _tiny_loaded()
    for name, data, want in (("flat", Subset(ds, [4, 0, 2]), ["dog/d2.png", "cat/c0.png", "dog/d0.png"]),
                             ("nested", Subset(Subset(ds, [4, 3, 2, 1]), [0, 2, -1]),
                              ["dog/d2.png", "dog/d0.png", "cat/c1.png"])):
        out = tmp_path / f"{name}.h5"
        qkhooks.record_dataset(loaded, data, out, **_EXT_KW)
        with qkhooks.open_run(out) as run:
            assert list(run.ids) == want, name
        assert _stored(out) == _reference([root / n for n in want]), name


def test_a_resume_over_a_subset_of_other_indices_is_refused(tmp_path):
    """Before: both subsets' items were '0', '1', ..., so the resume went on and one run held two sets of photos."""
    from torch.utils.data import Subset

    from test_review_symlinks_repair_messages import _interrupted
    from test_image_folder_ids_and_text_models import _image_folder
    from test_spectrum_edits_and_dataparallel import _tiny_loaded
    import qkhooks

    _, ds = _image_folder(tmp_path)
    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    _interrupted(loaded, out, batches=2, data=Subset(ds, [0, 1, 2, 3, 4]))
    with pytest.raises(qkhooks.QKHooksError, match="cat/c0.png"):
        qkhooks.record_dataset(loaded, Subset(ds, [1, 0, 2, 3, 4]), out, resume=True, layers="0", modes=2,
                               batch_size=2, progress=False, checkpoint_every=1)


def test_a_subset_holding_one_file_twice_is_refused_before_any_file_is_made(tmp_path):
    from torch.utils.data import Subset

    from test_image_folder_ids_and_text_models import _image_folder
    from test_spectrum_edits_and_dataparallel import _tiny_loaded
    import qkhooks

    _, ds = _image_folder(tmp_path)
    out = tmp_path / "run.h5"
    with pytest.raises(qkhooks.QKHooksError, match=r"items 0 and 2 have the same id 'cat/c1\.png'.*Nothing was"):
        qkhooks.record_dataset(_tiny_loaded(), Subset(ds, [1, 3, 1]), out, **_EXT_KW)
    assert not out.exists()


# -------------------------------------------------------------------- a hub name on a machine that cannot resolve it


def _resolver(monkeypatch, resolves: bool) -> list[str]:
    import socket

    asked: list[str] = []

    def getaddrinfo(host, *args, **kwargs):
        asked.append(host)
        if not resolves:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return asked


@pytest.mark.parametrize("resolves", [False, True])
def test_a_timm_hub_load_is_cache_only_exactly_while_the_hub_does_not_resolve(monkeypatch, resolves):
    """Before: with no network, each weights file was asked for five times with a backoff (~50 s for one model)
    before the same refusal. The stand-in for timm records huggingface_hub's offline mode as the load saw it."""
    import timm
    from huggingface_hub import constants

    from qkhooks.models.load import load_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = _resolver(monkeypatch, resolves)
    seen = []

    def create_model(name, pretrained=False, **kwargs):
        seen.append((name, pretrained, constants.HF_HUB_OFFLINE))
        raise OSError("no weights (stand-in)")

    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(qkhooks_error()) as caught:
        load_model("timm:vit_tiny_patch16_224")
    assert seen == [("vit_tiny_patch16_224", True, not resolves)]
    assert asked == ["huggingface.co"]
    assert constants.HF_HUB_OFFLINE is False  # given back after the load
    assert ("huggingface.co does not resolve from this machine" in str(caught.value)) is (not resolves)


def test_a_hf_hub_load_is_cache_only_while_the_hub_does_not_resolve_and_a_folder_asks_nothing(monkeypatch, tmp_path):
    import transformers
    from huggingface_hub import constants

    from qkhooks.models.load import load_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = _resolver(monkeypatch, resolves=False)
    seen = []

    def from_pretrained(ident, *args, **kwargs):
        seen.append((ident, constants.HF_HUB_OFFLINE))
        raise OSError("not cached (stand-in)")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(qkhooks_error(), match=r"hf:facebook/dino-vits16 \(huggingface\.co does not resolve"):
        load_model("hf:facebook/dino-vits16")
    assert seen == [("facebook/dino-vits16", True)] and asked == ["huggingface.co"]
    assert constants.HF_HUB_OFFLINE is False
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(qkhooks_error()) as caught:
        load_model(f"hf:{tmp_path}")
    assert seen[-1] == (str(tmp_path), False) and asked == ["huggingface.co"]  # a folder: no probe, no offline mode
    assert "does not resolve" not in str(caught.value)


@pytest.mark.parametrize("why", ["proxy", "offline already"])
def test_the_hub_is_not_probed_behind_a_proxy_or_when_offline_is_set(monkeypatch, why):
    from huggingface_hub import constants

    from qkhooks.models.load import _hub_unresolvable

    asked = _resolver(monkeypatch, resolves=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", why == "offline already")
    if why == "proxy":
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert _hub_unresolvable() is None and asked == []


def qkhooks_error():
    from qkhooks import QKHooksError

    return QKHooksError


@pytest.mark.parametrize("limit", [4.0, True, "4"])
def test_a_limit_that_is_no_integer_is_refused_before_anything_is_made(tmp_path, photos, limit):
    """Before: limit=4.0 passed the check and was stored as 4.0, so a resume's limit 4 differed from it (review r41)."""
    import qkhooks
    from test_spectrum_edits_and_dataparallel import _tiny_loaded

    out = tmp_path / "run.h5"
    with pytest.raises(qkhooks.QKHooksError, match=r"limit must be a positive integer or None, got"):
        qkhooks.record_dataset(_tiny_loaded(), str(photos), out=out, limit=limit, **_EXT_KW)
    assert not out.exists()


def test_a_numpy_integer_limit_is_stored_as_the_number_a_resume_compares(tmp_path, photos):
    import qkhooks
    from test_spectrum_edits_and_dataparallel import _tiny_loaded

    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=np.int64(3), **_EXT_KW)
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=np.int32(5), resume=True, **_EXT_KW)
    with qkhooks.open_run(out) as run:
        assert run.config["limit"] == 5 and type(run.config["limit"]) is int and run.ids == _PHOTOS[:5]
