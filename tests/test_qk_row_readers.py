"""Round 40 (lead): the q/k row readers every adapter shares (``qkhooks.models.leading_rows`` / ``stacked_rows``)."""

from __future__ import annotations

import torch
from torch import nn

import qkhooks


def test_stacked_rows_read_q_then_the_leading_k_rows_with_zeros_for_a_missing_bias_and_see_later_edits():
    torch.manual_seed(0)
    q, kv = nn.Linear(6, 4, bias=False), nn.Linear(6, 8)  # a fused kv: k is its first 4 rows
    read = qkhooks.models.stacked_rows(q, kv, k_rows=4)
    w, b = read()
    assert torch.equal(w, torch.cat([q.weight, kv.weight[:4]]))
    assert torch.equal(b, torch.cat([torch.zeros(4), kv.bias[:4]]))
    with torch.no_grad():
        kv.weight[1, 2] += 1.0
    assert read()[0][5, 2] == kv.weight[1, 2]  # read at each call, not copied when the reader is made
    assert qkhooks.models.stacked_rows(nn.Linear(6, 4, bias=False), nn.Linear(6, 4, bias=False))()[1] is None


def test_leading_rows_flatten_a_1x1_conv_and_take_separate_q_and_k_biases_when_the_module_has_them():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 9, 1)
    w, b = qkhooks.models.leading_rows(conv, 6)()
    assert w.shape == (6, 5) and torch.equal(w, conv.weight[:6, :, 0, 0]) and torch.equal(b, conv.bias[:6])
    owner = nn.Module()
    owner.q_bias, owner.k_bias = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    qkv = nn.Linear(5, 9, bias=False)
    w, b = qkhooks.models.leading_rows(qkv, 6, biases=owner)()
    assert torch.equal(w, qkv.weight[:6]) and torch.equal(b, torch.cat([owner.q_bias, owner.k_bias]))
    owner.q_bias = None  # the module no longer has them: the projection's own (absent) bias
    assert qkhooks.models.leading_rows(qkv, 6, biases=owner)()[1] is None


def test_the_library_imports_no_private_name_of_another_module():
    """DEVELOPERS.md: a name with a leading underscore is used in its own module only (round 40 renamed ~45 shared
    helpers that nine modules imported from others). Checked on the source, as test_imports checks cycles."""
    import ast
    import pathlib

    root = pathlib.Path(qkhooks.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qkhooks"):
                found += [f"{path.relative_to(root)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_a_run_names_its_data_as_recorded_with_its_paths_made_absolute(tmp_path, monkeypatch):
    """``RunReader.data`` (review USER: a run had ``.model`` but not ``.data``): the spec of the data it was recorded
    from, a relative folder made absolute, which open_dataset reopens to the same images."""
    from PIL import Image

    from qkhooks.data import open_dataset

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(folder / f"p{i}.png")
    monkeypatch.chdir(tmp_path)
    model = qkhooks.load_model(__import__("timm").create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=1, num_heads=2).eval())
    qkhooks.record_dataset(model, "photos", tmp_path / "run.h5", modes=2, batch_size=2)
    with qkhooks.open_run(tmp_path / "run.h5") as run:
        assert run.data == str(folder) == run.attrs["data"]
        assert list(open_dataset(run.data, model.image_config).ids) == list(run.ids) == ["p0.png", "p1.png"]
