"""What every section shares: models built once from a seed, images, the spectrum, a work folder."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from harness.sizes import SIZES


def _seeded(build: Callable[[], Any], seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class Bench:
    """The shared material of one benchmark: models (built once, from a seed), images, spectrum, a work folder.

    Models are built lazily, so a memory subprocess builds only what its method needs.
    """

    def __init__(self, size: str, batch: int, device: str | torch.device = "cpu", workdir: str | Path | None = None,
                 seed: int = 0):
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
        self.size = SIZES[size]
        self.batch = batch
        self.device = torch.device(device)
        self.seed = seed
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="qkhooks-bench-")
        self.workdir = Path(workdir) if workdir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed + 1)
        self.images = torch.randn(batch, 3, self.size.image, self.size.image, generator=g).to(self.device)
        self._models: dict[str, torch.nn.Module] = {}
        self._spectrum = None

    # -- models
    def timm(self, variant: str = "fused") -> torch.nn.Module:
        """``fused`` (as built), or a copy with fused attention off: ``eager`` (plain) or ``extract`` (hooked)."""
        key = f"timm-{variant}"
        if key not in self._models:
            if variant == "fused":
                import timm

                kwargs = dict(self.size.timm_kwargs)
                model = _seeded(lambda: timm.create_model(self.size.timm_name, pretrained=False, **kwargs), self.seed)
                self._models[key] = model.eval().to(self.device)
            else:
                model = copy.deepcopy(self.timm("fused"))
                for module in model.modules():
                    if hasattr(module, "fused_attn"):
                        module.fused_attn = False
                self._models[key] = model
        return self._models[key]

    def hf(self, implementation: str) -> torch.nn.Module:
        """HF ``ViTModel`` of the same shape from a config (random init), attention ``sdpa`` or ``eager``."""
        key = f"hf-{implementation}"
        if key not in self._models:
            import transformers

            s = self.size
            config = transformers.ViTConfig(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                            intermediate_size=s.mlp, image_size=s.image, patch_size=s.patch, qkv_bias=True)
            model = _seeded(lambda: transformers.ViTModel._from_config(config, attn_implementation=implementation),
                            self.seed)
            self._models[key] = model.eval().to(self.device)
        return self._models[key]

    @property
    def spectrum(self):
        """The full spectrum of the fused timm model (computed once, reused by every recording)."""
        if self._spectrum is None:
            import qkhooks

            self._spectrum = qkhooks.spectrum(self.timm())
        return self._spectrum

    def sites(self):
        import qkhooks

        return qkhooks.sites(self.timm())

    @property
    def query_tokens(self) -> torch.Tensor:
        """(B, 2): the CLS token and the centre patch of every image."""
        grid = self.size.image // self.size.patch
        centre = 1 + (grid // 2) * grid + grid // 2
        return torch.tensor([[0, centre]] * self.batch)

    def close(self) -> None:
        self._models.clear()
        if self._tmp is not None:
            self._tmp.cleanup()


def make_image_folder(folder: Path, count: int, size: int = 224, seed: int = 0) -> Path:
    """``count`` smooth random JPEGs (real decoding work, deterministic)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"img{i:05d}.jpg"
        if path.exists():
            continue
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(path, quality=90)
    return folder


def round_material(args: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """What the kept round scripts (``benchmarks/round*.py``) record: a random-init timm ``args.model`` (seed 0, eval
    mode) run with ``args.threads`` torch threads, its spectrum, ``args.batch`` random images and each image's query
    tokens 0 and 100."""
    import timm

    import qkhooks

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    return (model, qkhooks.spectrum(model), torch.randn(args.batch, 3, 224, 224),
            torch.tensor([[0, 100]] * args.batch))
