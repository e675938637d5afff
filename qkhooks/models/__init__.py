"""Finding attention layers in real models (one file per family) and loading models from spec strings."""

from qkhooks.models.base import (AttentionSite, QKRows, QKWeights, adapters, find_sites, leading_rows, parse_layers,
                                 register_adapter, stacked_rows)
from qkhooks.models import timm as _timm  # noqa: F401  (registers the adapter)
from qkhooks.models import timm_backbone as _timm_backbone  # noqa: F401  (zoo11-build: transformers' TimmBackbone, before hf-vit)
from qkhooks.models import hf as _hf  # noqa: F401  (registers the adapter)
from qkhooks.models import packed as _packed  # noqa: F401  (teaches the HF adapter packed vision towers: Qwen-VL, GLM-4V)
from qkhooks.models import reduced_keys as _reduced_keys  # noqa: F401  (teaches the adapters reduced keys)
from qkhooks.models import windows as _windows  # noqa: F401  (teaches the adapters windowed attention)
from qkhooks.models import cosine as _cosine  # noqa: F401  (teaches the adapters Swin-v2's cosine attention)
from qkhooks.models import gemma4 as _gemma4  # noqa: F401  (registers the adapter)
from qkhooks.models import biased as _biased  # noqa: F401  (teaches the timm adapter position-indexed biases)
from qkhooks.models import levit as _levit  # noqa: F401  (LeViT-style: BatchNorm folded into W_q/W_k, SHViT)
from qkhooks.models import detr as _detr  # noqa: F401  (registers the adapter)
from qkhooks.models import mobilevit as _mobilevit  # noqa: F401  (timm MobileViT: attention over unfolded patches)
from qkhooks.models import plain as _plain  # noqa: F401  (teaches the timm adapter MetaFormer, FastViT, Visformer)
from qkhooks.models import relpos as _relpos  # noqa: F401  (teaches the adapters relative positions, SAM/ViTDet windows)
from qkhooks.models import halo as _halo  # noqa: F401  (teaches the timm adapter BoTNet's PosEmbedRel term)
from qkhooks.models import blocks as _blocks  # noqa: F401  (teaches the timm adapter NesT and TNT blocks)
from qkhooks.models import pooled as _pooled  # noqa: F401  (Hiera's pooled queries, MViTv2; pool-first refusal)
from qkhooks.models import sam2 as _sam2  # noqa: F401  (SAM2's Hiera-det: pooled queries inside windows)
from qkhooks.models import hf_levit as _hf_levit  # noqa: F401  (registers the adapter: transformers' LeViT)
from qkhooks.models import video as _video  # noqa: F401  (VideoMAE / ViViT joint space-time attention)
from qkhooks.models import davit as _davit  # noqa: F401  (DaViT spatial windows; channel blocks left out by name)
from qkhooks.models import gcvit as _gcvit  # noqa: F401  (GCViT local windows; global-query blocks maps only)
from qkhooks.models import imagegpt as _imagegpt  # noqa: F401  (ImageGPT: causal attention over colour-cluster tokens)
from qkhooks.models import softcap as _softcap  # noqa: F401  (VideoPrism: soft-capped logits, factorised encoder)
from qkhooks.models import llama4 as _llama4  # noqa: F401  (Llama 4 vision: complex 2-D RoPE, class token last)
from qkhooks.models import parallel as _parallel  # noqa: F401  (timm's parallel blocks: ViT-22B style in_proj)
from qkhooks.models import two_softmax as _two_softmax  # noqa: F401  (two-softmax maps: DiffAttention, ConViT GPSA + MHSA)
from qkhooks.models import cascaded as _cascaded  # noqa: F401  (EfficientViT-MSRA cascaded heads, maps only)
from qkhooks.models import vlm as _vlm  # noqa: F401  (zoo11-build: VLMs' language models left out by design)
from qkhooks.models import sam3 as _sam3  # noqa: F401  (SAM3: windowed 2-D RoPE on interleaved pairs)
from qkhooks.models import volo as _volo  # noqa: F401  (zoo11-build: VOLO's plain and class attention; outlook left out)
from qkhooks.models import torchvision as _torchvision  # noqa: F401  (registers the adapter: torchvision ViT)

sites = find_sites

__all__ = ["AttentionSite", "QKRows", "QKWeights", "adapters", "sites", "find_sites", "parse_layers", "register_adapter",
           "leading_rows", "stacked_rows"]
