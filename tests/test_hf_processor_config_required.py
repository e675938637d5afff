"""Round 30: a pretrained ``hf:`` checkpoint without an image processor config is refused, not given guessed
preprocessing: statistics picked by ``model_type`` would move every activation without a word. Random weights (which
no preprocessing is right for) still take the guess, with its warning; a given ``image_config`` or the folder's own
``preprocessor_config.json`` is used exactly."""

from __future__ import annotations

import warnings

import pytest
import torch

from qkhooks.data import ImageConfig
from qkhooks.errors import QKHooksError
from qkhooks.models.load import load_model
from test_inputs import TINY_VIT


@pytest.fixture
def hf_checkpoint(tmp_path):
    """A tiny pretrained-looking ViT folder: config and weights, as save_pretrained writes them, no processor."""
    import transformers

    torch.manual_seed(0)
    folder = tmp_path / "tiny-vit"
    transformers.ViTModel(transformers.ViTConfig(**TINY_VIT)).save_pretrained(folder)
    return folder


def test_a_pretrained_hf_folder_without_a_processor_config_is_refused_naming_both_fixes(hf_checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before any guess is made (and warned about)
        with pytest.raises(QKHooksError, match=r"^hf:\S+ has no image processor config .*qkhooks does not guess it for "
                                               r"pretrained weights.*preprocessor_config\.json in the folder.*"
                                               r"image_config=qkhooks\.data\.ImageConfig\.from_hf\(processor_dict\)"):
            load_model(f"hf:{hf_checkpoint}")


def test_the_folders_processor_config_or_a_given_image_config_is_used_exactly(hf_checkpoint):
    import transformers

    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    given = ImageConfig(size=(32, 32), mean=mean, std=std)
    loaded = load_model(f"hf:{hf_checkpoint}", image_config=given)
    assert loaded.image_config is given and not loaded.random_init
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(mean),
                                   image_std=list(std)).save_pretrained(hf_checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_model(f"hf:{hf_checkpoint}")
    config = loaded.image_config
    assert tuple(config.size) == (32, 32) and tuple(config.mean) == pytest.approx(mean) and tuple(config.std) == pytest.approx(std)
    reference = transformers.ViTModel.from_pretrained(hf_checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), reference.state_dict().values()))


def test_random_weights_from_a_folder_without_a_processor_config_take_the_guess_and_say_so(hf_checkpoint):
    with pytest.warns(UserWarning, match=r"guessed preprocessing for model_type='vit'"):
        loaded = load_model(f"hf:{hf_checkpoint}@random")
    assert loaded.random_init and tuple(loaded.image_config.mean) == (0.5, 0.5, 0.5)


def test_a_module_loaded_from_a_folder_reads_the_processor_saved_beside_it_and_guesses_only_without_one(hf_checkpoint):
    """``load_model(ViTModel.from_pretrained(DIR))``: the module remembers its folder (``config._name_or_path``), so
    the processor config saved there is read exactly; a module from a folder without one gets the guess, said."""
    import transformers

    module = transformers.ViTModel.from_pretrained(hf_checkpoint).eval()
    with pytest.warns(UserWarning, match="guessed preprocessing"):
        load_model(module)
    mean, std = (0.15, 0.25, 0.35), (0.45, 0.55, 0.65)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(mean),
                                   image_std=list(std)).save_pretrained(hf_checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_model(transformers.ViTModel.from_pretrained(hf_checkpoint).eval()).image_config
    assert tuple(config.mean) == pytest.approx(mean) and tuple(config.std) == pytest.approx(std)


@pytest.mark.parametrize("saved", ['{"image_processor_type": "NoSuchImageProcessor"}', "{not json"])
def test_a_processor_saved_beside_a_module_that_cannot_be_read_is_refused_not_replaced_by_the_guess(hf_checkpoint, saved):
    import transformers

    (hf_checkpoint / "preprocessor_config.json").write_text(saved)
    module = transformers.ViTModel.from_pretrained(hf_checkpoint).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no guess is made (and warned about)
        with pytest.raises(QKHooksError, match=r"^the image processor saved with this model .* could not be read .*"
                                               r"image_config=qkhooks\.data\.ImageConfig\(\.\.\.\)\)\.$"):
            load_model(module)
