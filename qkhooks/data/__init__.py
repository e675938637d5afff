"""Images and masks in model-input geometry: preprocessing, datasets, O3 stimuli, mask helpers.

Everything here keeps masks aligned with the pixels the model sees, because the
object-level analyses in qkhooks compare attention on the patch grid with
where objects are.
"""

from qkhooks.data.datasets import DATASET_SPECS, open_dataset
from qkhooks.data.display import to_rgb
from qkhooks.data.geometry import Geometry
from qkhooks.data.items import IMAGE_EXTENSIONS, ImageDataset, collate
from qkhooks.data.masks import (TokenCells, downscale_mask, labels_to_onehot, majority_labels, patch_argmax,
                                receptive_cells, token_cells)
from qkhooks.data.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageConfig
from qkhooks.data.sources import ItemStream, open_source
from qkhooks.data.stimuli import FEATURES, SHAPES, ItemSpec, O3Stimulus, generate_o3, make_o3

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASET_SPECS",
    "FEATURES",
    "Geometry",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageConfig",
    "ImageDataset",
    "ItemSpec",
    "ItemStream",
    "O3Stimulus",
    "SHAPES",
    "TokenCells",
    "collate",
    "downscale_mask",
    "generate_o3",
    "labels_to_onehot",
    "majority_labels",
    "make_o3",
    "open_dataset",
    "open_source",
    "patch_argmax",
    "receptive_cells",
    "to_rgb",
    "token_cells",
]
