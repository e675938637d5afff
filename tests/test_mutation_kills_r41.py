"""Round 41 (mutation): tests that kill the survivors of module ``round41`` (round 41's library lines, `6ff989d..e1a1dee`)
that change behaviour: the hub probe's endpoint and what a load without pretrained weights asks, the refusals'
words, a resume's limits where the run has none, the stored config a resume reads when it is missing or no object,
a relative data spec of an older run, and ``file_sizes`` of data not read from files. See tests/MUTATION.md."""

from __future__ import annotations

import json

import h5py
import pytest

import qkhooks
from qkhooks import QKHooksError
from test_limit_extension_and_stamps import _EXT_KW, _PHOTOS, _resolver, photos  # noqa: F401 - the fixture
from test_spectrum_edits_and_dataparallel import _tiny_loaded


@pytest.mark.parametrize("endpoint, host", [("https://hub.example.org:8443", "hub.example.org"),
                                            ("", "huggingface.co")])
def test_the_probe_asks_for_the_host_of_the_endpoint_in_use(monkeypatch, endpoint, host):
    from huggingface_hub import constants

    from qkhooks.models.load import _hub_unresolvable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    asked = _resolver(monkeypatch, resolves=False)
    assert _hub_unresolvable() == host and asked == [host]


def _timm_stand_in(monkeypatch, raises: BaseException | None = None) -> list[tuple]:
    import timm
    from huggingface_hub import constants

    seen: list[tuple] = []

    def create_model(name, pretrained=False, **kwargs):
        seen.append((name, pretrained, constants.HF_HUB_OFFLINE))
        if raises is not None:
            raise raises
        return timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                                                num_heads=2)

    monkeypatch.setattr(timm, "create_model", create_model)
    return seen


def test_random_weights_ask_no_hub_and_load_as_random(monkeypatch):
    """Random weights are no download: no probe, no offline mode, ``pretrained=False``."""
    from huggingface_hub import constants

    from qkhooks.models.load import load_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = _resolver(monkeypatch, resolves=False)
    seen = _timm_stand_in(monkeypatch)
    loaded = load_model("timm:vit_tiny_patch16_224", random_init=True)
    assert seen == [("vit_tiny_patch16_224", False, False)] and asked == []
    assert loaded.random_init and loaded.weights == "random"


def test_a_name_timm_does_not_know_is_named_as_such(monkeypatch):
    from qkhooks.models.load import load_model

    _resolver(monkeypatch, resolves=True)
    _timm_stand_in(monkeypatch, RuntimeError("Unknown model (vit_nope)"))
    with pytest.raises(QKHooksError, match=r"timm does not know the model 'vit_nope'; list names with timm\.list_"):
        load_model("timm:vit_nope")


def test_the_missing_weights_refusal_says_what_to_pass_and_names_no_host_when_the_hub_resolves(monkeypatch):
    from qkhooks.models.load import load_model

    _resolver(monkeypatch, resolves=True)
    _timm_stand_in(monkeypatch, OSError("no weights (stand-in)"))
    with pytest.raises(QKHooksError) as caught:
        load_model("timm:vit_tiny_patch16_224")
    assert str(caught.value).startswith("could not fetch the weights of timm:vit_tiny_patch16_224 (OSError: no weights")
    assert str(caught.value).endswith("Without network, pass --random-init / random_init=True, or a local checkpoint "
                                      "with --checkpoint PATH.")


def test_the_hf_config_refusal_says_what_to_give(monkeypatch):
    import transformers

    from qkhooks.models.load import load_model

    _resolver(monkeypatch, resolves=False)

    def from_pretrained(ident, *args, **kwargs):
        raise OSError("not cached (stand-in)")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(QKHooksError) as caught:
        load_model("hf:facebook/dino-vits16")
    assert str(caught.value).endswith("Give a hub id that is cached or reachable, or a local folder written by "
                                      "save_pretrained.")


def _tiny_vit_config():
    import transformers

    return transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32)


@pytest.mark.parametrize("where", ["folder", "hub"])
def test_hf_random_weights_are_built_from_the_config_alone(monkeypatch, tmp_path, where):
    """random_init reaches the loader from a folder and from a hub id (a mutant passing None loaded pretrained weights:
    a folder with a config alone was then refused for having no weights)."""
    import transformers

    from qkhooks.models.load import load_model

    _resolver(monkeypatch, resolves=False)
    if where == "folder":
        _tiny_vit_config().save_pretrained(tmp_path)
        spec = f"hf:{tmp_path}"
    else:
        monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda ident, *a, **k: _tiny_vit_config())
        spec = "hf:google/vit-tiny-stand-in"
    with pytest.warns(UserWarning):  # no image processor config: the guess for random weights is warned about
        loaded = load_model(spec, random_init=True)
    assert loaded.random_init and type(loaded.model).__name__ == "ViTModel"


def test_a_run_of_all_the_data_is_not_resumed_with_a_limit_below_what_it_holds(tmp_path, photos):  # noqa: F811
    """A run of no limit holds all the data: a resume with a limit below its images would drop some, refused naming
    both (round 42: a limit it has not passed is taken, test_lower_limit_after_extension)."""
    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=None, **_EXT_KW)
    with pytest.raises(QKHooksError, match=r"--limit 3: it was recorded with no --limit \(all the data\) and holds 9 "
                                           r"images, more than 3\."):
        qkhooks.record_dataset(loaded, str(photos), out=out, limit=3, resume=True, **_EXT_KW)


@pytest.mark.parametrize("config", [None, "[1, 2]"])
def test_a_run_file_whose_config_is_missing_or_no_object_is_refused_by_the_resume(tmp_path, photos, config):  # noqa: F811
    """What a resume reads of the run's config before the writer opens it: a file without one, or with a JSON array,
    is the writer's to refuse (before: a TypeError or AttributeError from reading it)."""
    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=2, **_EXT_KW)
    with h5py.File(out, "r+") as f:
        if config is None:
            del f.attrs["config"]
        else:
            f.attrs["config"] = config
    with pytest.raises(QKHooksError, match=f"cannot resume {out}"):
        qkhooks.record_dataset(loaded, str(photos), out=out, limit=4, resume=True, **_EXT_KW)


def test_an_older_runs_relative_folder_resumes_from_where_it_was_recorded(tmp_path, photos, monkeypatch):  # noqa: F811
    """Runs recorded before specs were made absolute store the folder as typed; resumed from the folder they were
    recorded in, they name the same data and resume (and grow)."""
    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=3, **_EXT_KW)
    with h5py.File(out, "r+") as f:  # as an earlier qkhooks wrote it: the folder relative to where it ran
        config = json.loads(f.attrs["config"])
        config["data"] = f.attrs["data"] = photos.name
        f.attrs["config"] = json.dumps(config, sort_keys=True)
    monkeypatch.chdir(photos.parent)
    result = qkhooks.record_dataset(loaded, photos.name, out=out, limit=5, resume=True, **_EXT_KW)
    assert result.resumed_from == 3
    with qkhooks.open_run(out) as run:
        assert run.ids == _PHOTOS[:5] and run.config["data"] == photos.name


def test_data_not_read_from_files_has_no_file_sizes():
    import numpy as np

    from qkhooks.data_files import file_sizes

    assert file_sizes([np.zeros((8, 8, 3), np.uint8)]) == {}
    assert file_sizes(object()) == {}


def test_an_empty_subset_of_a_folder_is_refused_as_no_images(tmp_path):
    from torch.utils.data import Subset

    from test_image_folder_ids_and_text_models import _image_folder

    _, ds = _image_folder(tmp_path)
    out = tmp_path / "run.h5"
    with pytest.raises(QKHooksError, match="no images|empty"):
        qkhooks.record_dataset(_tiny_loaded(), Subset(ds, []), out, **_EXT_KW)
    assert not out.exists()


def test_a_resume_over_another_folder_holding_the_same_files_is_refused(tmp_path, photos):  # noqa: F811
    """The data spec is part of what a resume compares: a copy of the folder elsewhere (the same names, bytes and
    times, so every file check passes) is other data, refused (the run's own spec stands in only for the same folder
    typed relatively)."""
    import shutil

    loaded, out = _tiny_loaded(), tmp_path / "run.h5"
    qkhooks.record_dataset(loaded, str(photos), out=out, limit=2, **_EXT_KW)
    copy = shutil.copytree(photos, tmp_path / "copy")
    with pytest.raises(QKHooksError, match="config differs"):
        qkhooks.record_dataset(loaded, str(copy), out=out, limit=2, resume=True, **_EXT_KW)
