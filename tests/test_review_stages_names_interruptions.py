"""Round 35's review findings, each a test that fails on the code before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import qkhooks
from test_zoo import SMALL_VIT, _call, eager_maps, perturb


def test_parallel_things_blocks_are_one_stage_and_record_rows_with_the_default_query_tokens():
    """timm's 18x2 ViTs run two attentions side by side in each block (``blocks.1.attns.0.attn``). Each block's branch
    list was taken for a stage of its own, so rows with the default query tokens were refused as if the blocks had
    different grids (review r35 A). They are one stage, ``blocks``, and the rows equal the eager maps' rows."""
    model = perturb(timm.create_model("vit_small_patch16_18x2_224", pretrained=False, **{**SMALL_VIT, "img_size": 48}))
    inputs = {"x": torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))}
    sites = qkhooks.sites(model)
    assert [s.path for s in sites] == [f"blocks.{b}.attns.{a}.attn" for b in range(2) for a in range(2)]
    assert {s.stage for s in sites} == {"blocks"}
    want = eager_maps(model, sites, inputs, "timm")
    with qkhooks.record(model, modes=None, attention="rows") as run:
        _call(model, inputs)
    tokens = run.last.meta["query_tokens"]
    assert tokens.tolist() == [[0, 1 + 3 * 6 + 3]] * 2  # the class token and the centre of the 6x6 grid
    for layer, maps in enumerate(want):
        picked = torch.stack([maps[b][:, tokens[b]] for b in range(2)])
        assert float((run.attention(layer, "rows") - picked).abs().max()) < 1e-5


def test_stages_of_a_multi_stage_model_stay_apart():
    """The parallel-block rule does not merge real stages: PiT's transformers keep a stage each."""
    model = timm.create_model("pit_ti_224", pretrained=False, img_size=64)
    stages = [s.stage for s in qkhooks.sites(model)]
    assert len(set(stages)) == 3 and stages == sorted(stages)


@pytest.mark.parametrize("name, size", [("vit_tiny_patch16_224", 32), ("vit_tiny_patch16_224", 96),
                                        ("beitv2_base_patch16_224", 32), ("convit_tiny", 32)])
def test_a_float64_models_rebuilt_maps_and_rows_are_float64_like_its_eager_attention(name, size):
    """A float64 model's full maps and rows rebuilt beside its fused kernel (the default outputs) were a float32
    softmax, ~2e-9 from its own float64 eager maps, while ``outputs="eager"`` kept float64 (review r35 A). They now
    stay float64: at 17 and at 145 tokens (the per-image pass), with a relative position bias (BEiT), and where
    two softmaxes make the map (ConViT's GPSA, whose terms were still float32: review r35 C)."""
    model = perturb(timm.create_model(name, pretrained=False, **{**SMALL_VIT, "img_size": size})).double()
    inputs = {"x": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)}
    sites = qkhooks.sites(model)
    want = eager_maps(model, sites, inputs, "timm")
    with qkhooks.record(model, modes=None, attention="rows+full") as run:
        _call(model, inputs)
    tokens = run.last.meta["query_tokens"]
    for layer, maps in enumerate(want):
        assert maps.dtype == torch.float64
        full, rows = run.attention(layer, "full"), run.attention(layer, "rows")
        assert full.dtype == rows.dtype == torch.float64
        assert float((full - maps).abs().max()) < 1e-12
        picked = torch.stack([maps[b][:, tokens[b]] for b in range(2)])
        assert float((rows - picked).abs().max()) < 1e-12


# ------------------------------------------------------------------ review r35 B: the user's own data
def _photo(seed: int, size: int = 32) -> "Image.Image":
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _square_mask(top: int, size: int = 32) -> "Image.Image":
    from PIL import Image

    mask = np.zeros((size, size), np.uint8)
    mask[top:top + 8, 4:12] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize("clash", ["images", "targ_images"])
def test_an_o3_folder_with_names_differing_only_by_extension_is_refused(tmp_path, clash):
    """``images/x.jpg`` and ``images/x.png`` both took the masks of ``x`` (the later file's), so one photo was scored
    against the other's target and distractor without a word; two mask files for one name left it unknown which is
    the image's. Refused, naming both files."""
    from qkhooks.data import open_dataset
    from qkhooks.data.preprocess import ImageConfig

    for folder in ("images", "targ_images", "dist_images"):
        (tmp_path / folder).mkdir()
    for ext in ("jpg", "png") if clash == "images" else ("png",):
        _photo(1).save(tmp_path / "images" / f"x.{ext}")
    for ext in ("png",) if clash == "images" else ("jpg", "png"):
        _square_mask(2).save(tmp_path / "targ_images" / f"x.{ext}")
    _square_mask(20).save(tmp_path / "dist_images" / "x.png")
    cfg = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(qkhooks.QKHooksError, match=rf"/{clash}': 1 file name\(s\) differ only by their extension "
                                                   r"\(x\.jpg and x\.png\).* Rename or remove one of each"):
        open_dataset(f"o3dir:{tmp_path}", cfg)
    (tmp_path / clash / "x.jpg").unlink()  # one file per name: opened, one item
    assert open_dataset(f"o3dir:{tmp_path}", cfg).ids == ["x.png"]


def test_an_ade20k_split_with_names_differing_only_by_extension_is_refused(tmp_path):
    """``images/training/x.jpg`` and ``x.png`` both took ``annotations/training/x.png``. Refused, naming both."""
    from PIL import Image

    from qkhooks.data import open_dataset
    from qkhooks.data.preprocess import ImageConfig

    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    _photo(1).save(tmp_path / "images" / "training" / "x.jpg")
    _photo(2).save(tmp_path / "images" / "training" / "x.png")
    Image.fromarray(np.full((32, 32), 3, np.uint8)).save(tmp_path / "annotations" / "training" / "x.png")
    cfg = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(qkhooks.QKHooksError, match=r"training': 1 file name\(s\) differ only by their extension "
                                                   r"\(x\.jpg and x\.png\), so each pair would be recorded with the "
                                                   r"same annotation"):
        open_dataset(f"ade20k:{tmp_path}", cfg)
    (tmp_path / "images" / "training" / "x.jpg").unlink()
    assert open_dataset(f"ade20k:{tmp_path}", cfg).ids == ["training/x.png"]


@pytest.mark.parametrize("fault", ["negative ids", "wrong size", "ids past int32"])
def test_a_mask_refused_after_the_first_batch_says_the_run_file_is_incomplete_and_how_to_go_on(tmp_path, fault):
    """Three refusals of an item's masks were plain errors: found after the first batch, they left an incomplete run
    file without saying so (README promises the file, its committed images and the fix). Now each names the item and
    says where the file stands; the negative ids' refusal names the fix too (it read 'labels must be >= 0')."""
    loaded = qkhooks.load_model("timm:vit_tiny_patch16_224@random")
    items = []
    for i in range(6):
        objects = np.zeros((32, 32), np.int64)
        objects[:, 16:] = 1
        if i == 4:
            if fault == "negative ids":
                objects[:4, :4] = -5
            elif fault == "wrong size":
                objects = objects[:30]
            else:
                objects[:, 16:] = 2**31
        items.append({"image": _photo(i), "id": f"item{i}", "objects": objects})
    why = {"negative ids": r"holds negative ids \(from -5\).*mask\[mask < 0\] = 0",
           "wrong size": r"has size \(30, 32\) but its image is \(32, 32\)",
           "ids past int32": r"holds ids 0\.\.2147483648, outside int32"}[fault]
    with pytest.raises(qkhooks.QKHooksError, match=rf"mask 'objects' of 'item4' {why}.* The 4 images before it "
                                                   rf"stay committed in .*run\.h5: fix the data and run the same "
                                                   rf"command with --resume"):
        qkhooks.record_dataset(loaded, items, tmp_path / "run.h5", layers="0", modes=2, batch_size=2, progress=False)
    with qkhooks.open_run(tmp_path / "run.h5") as run:
        assert run.n == 4 and not run.complete


def test_a_thin_strip_is_skipped_in_a_folder_and_refused_beside_masks_not_resized_into_gigabytes(tmp_path, monkeypatch):
    """The shorter-side resize ran on the whole image before the crop: a 1 x 4,000 PNG cost ~1 GB, a 1 x 100,000
    one would have been killed without a word. Past PIL's decompression-bomb limit the resize is refused, naming
    the sizes: a folder skips that image (listed, warned), a dataset with masks refuses it, naming the item."""
    from PIL import Image

    from qkhooks.data import open_dataset
    from qkhooks.data.items import preprocess_raw, RawItem
    from qkhooks.data.preprocess import ImageConfig

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # a small limit: the strip below stays small on disk
    Image.fromarray(np.zeros((1, 2000, 3), np.uint8)).save(tmp_path / "strip.png")  # 248 x 496,000 once resized
    _photo(1, 64).save(tmp_path / "photo.png")
    cfg = ImageConfig(size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3, resize=248)
    dataset = open_dataset(str(tmp_path), cfg)
    assert dataset.ids == ["photo.png", "strip.png"]
    with pytest.warns(UserWarning, match=r"skipping image the model's preprocessing cannot take .*strip\.png"):
        assert dataset[1] is None
    assert dataset[0]["pixel_values"].shape == (3, 224, 224)
    (skipped_id, reason), = dataset.skipped
    assert skipped_id == "strip.png"
    assert "an image of 1x2000 pixels (height x width) would be resized to 248x496000 (123,008,000 pixels" in reason
    strip = Image.open(tmp_path / "strip.png").convert("RGB")
    with pytest.raises(qkhooks.QKHooksError, match=r"mine: 'strip': an image of 1x2000 pixels .* Crop it to a less "
                                                   r"extreme aspect ratio first, or raise that limit"):
        preprocess_raw("mine", cfg, "strip", RawItem(image=strip, objects=np.zeros((1, 2000), np.int64)))


@pytest.mark.parametrize("option, value", [("same_object_top", 0), ("same_object_top", -3), ("figure_modes", -1),
                                           ("same_object_top", 2.5)])
def test_analyze_modes_refuses_counts_it_cannot_take_before_writing(tmp_path, option, value):
    """--same-object-top 0 or -3 wrote an all-NaN same_object.csv and exit 0; --figure-modes -1 drew nothing."""
    from qkhooks.analysis.modes import analyze_modes
    from qkhooks.cli import main

    with pytest.raises(qkhooks.QKHooksError, match=rf"{option} \(--{option.replace('_', '-')}\) must be a whole "):
        analyze_modes(tmp_path / "no-run.h5", tmp_path / "out", **{option: value})
    flag = f"--{option.replace('_', '-')}"
    argv = ["analyze", "modes", str(tmp_path / "no-run.h5"), "--out", str(tmp_path / "cli"), flag, str(value)]
    if isinstance(value, int):
        assert main(argv) == 2
    else:  # not a whole number: argparse's own refusal
        with pytest.raises(SystemExit):
            main(argv)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


@pytest.mark.parametrize("kind", ["text", "other hdf5"])
@pytest.mark.parametrize("mode", ["overwrite", "resume"])
def test_resume_and_overwrite_refuse_a_file_that_is_no_run_and_leave_it_alone(tmp_path, kind, mode):
    """--resume on a text file called it damaged and named `qkhooks repair`; --overwrite replaced a text file or
    another program's HDF5 file with a run. Both are refused, naming what the file is, and the file is left as it was."""
    import h5py

    from qkhooks.store import RunWriter

    path = tmp_path / "out.h5"
    if kind == "text":
        path.write_text("my notes\n")
    else:
        with h5py.File(path, "w") as f:
            f["measurements"] = np.arange(3)
    before = path.read_bytes()
    what = "not HDF5 at all" if kind == "text" else "another program's HDF5 file"
    want = (rf"cannot resume .*out\.h5: it is not a qkhooks run \({what}" if mode == "resume"
            else rf"out\.h5 is not a qkhooks run \({what}.*--overwrite \(overwrite=True\) replaces only a run")
    with pytest.raises(qkhooks.QKHooksError, match=want):
        RunWriter(path, mode=mode)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]  # no lock, checkpoint or half-made run left


def test_an_interrupted_recording_says_where_its_run_file_stands_and_how_to_go_on(tmp_path, capsys, monkeypatch):
    """Ctrl-C printed only 'qkhooks: interrupted'. The interrupt now carries the run file's committed count and what
    --resume keeps of it: the reducers' last checkpoint, which a resume continues from (review r35 C: 'continues
    after them' was wrong before the first checkpoint); still a KeyboardInterrupt, and the CLI prints it."""
    from qkhooks.errors import RunInterrupted

    loaded = qkhooks.load_model("timm:vit_tiny_patch16_224@random")
    items = [{"image": _photo(i), "id": f"item{i}"} for i in range(8)]

    def stop_after(n: int):
        seen = []

        def interrupt(batch) -> None:
            seen.append(batch)
            if len(seen) == n:
                raise KeyboardInterrupt

        return interrupt

    kw = dict(layers="0", modes=2, batch_size=2, progress=False)
    for every, kept in ((8, 0), (1, None)):  # no checkpoint yet: none kept; one a batch: what the checkpoint holds
        with pytest.raises(RunInterrupted) as err:
            qkhooks.record_dataset(loaded, items, tmp_path / f"run{every}.h5", on_batch=stop_after(3),
                                   checkpoint_every=every, **kw)
        assert isinstance(err.value, KeyboardInterrupt)
        with qkhooks.open_run(tmp_path / f"run{every}.h5") as run:
            committed = run.n
        result = qkhooks.record_dataset(loaded, items, tmp_path / f"run{every}.h5", resume=True, **kw)
        if kept is None:  # a checkpoint a batch: a resume redoes at most the batch in flight, whole batches kept
            kept = result.resumed_from
            assert kept % 2 == 0 and 2 <= kept and committed - 2 <= kept <= committed
        assert result.resumed_from == kept and 0 < committed <= 6
        if kept == committed:
            assert str(err.value) == (f"{tmp_path / f'run{every}.h5'} keeps {committed} committed images; the same "
                                      "command with --resume continues after them.")
        else:
            assert str(err.value) == (f"{tmp_path / f'run{every}.h5'} keeps {committed} committed images, {kept} of "
                                      f"them in its reducers' last checkpoint: the same command with --resume "
                                      f"continues after those {kept} and records the {committed - kept} after them "
                                      "again (the reducers are checkpointed every 8 batches by default: "
                                      "--checkpoint-every N, or checkpoint_every=N in Python).")
        with qkhooks.open_run(tmp_path / f"run{every}.h5") as run:
            assert run.ids == [f"item{i}" for i in range(8)] and run.complete
    # the CLI prints it (exit 130), where it printed "qkhooks: interrupted" alone
    from qkhooks import stream
    from qkhooks.cli import main

    def interrupted(*args, **kwargs):
        raise RunInterrupted("run.h5 keeps 4 committed images; run the same command with --resume to continue after them.")

    monkeypatch.setattr(stream, "record_dataset", interrupted)
    (tmp_path / "imgs").mkdir()
    _photo(0).save(tmp_path / "imgs" / "a.png")
    assert main(["record", "timm:vit_tiny_patch16_224", str(tmp_path / "imgs"), "--random-init", "--layers", "0",
                 "--out", str(tmp_path / "cli.h5")]) == 130
    assert capsys.readouterr().err.endswith("qkhooks: interrupted: run.h5 keeps 4 committed images; run the same "
                                            "command with --resume to continue after them.\n")


def test_a_low_position_probe_from_p_says_what_that_probe_reads():
    """A position-dominated model with random position embeddings read 'split_isolates_position=False' with R2 from
    P of -6 while P carried 98 % of X (review r35 D): P's probe predicts held-out positions from the others. The
    sentence now says so where P's R2 is below the line, and stays as it was where it is not."""
    from qkhooks.analysis.bfd_summary import paper_claims
    from test_bfd import _fake_result

    cc_head = {"CC": 0.7, "CP": 0.2, "PC": 0.05, "PP": 0.05}
    low = paper_claims(_fake_result([cc_head], ["CC"], r2=(-6.4, 0.0)))
    high = paper_claims(_fake_result([cc_head], ["CC"], r2=(0.9, 0.0)))
    assert low["split_isolates_position"] is False and high["split_isolates_position"] is True
    assert low["sentences"][-1].endswith("P's probe predicts held-out positions from the others, so a P that labels "
                                         "positions without encoding where they are (random position embeddings) "
                                         "reads low however much of X it carries.")
    assert high["sentences"][-1].endswith("highest R2 from C 0.00 (needs <= 0.1).")


def test_decoding_workers_take_the_main_processs_pil_limit(monkeypatch):
    """A worker started by spawn or forkserver imports PIL afresh, with its default limit: a limit set in the main
    process did not reach it, so a thin strip skipped without workers was recorded with one (review r35 C). Both
    kinds of decoding worker now start with the main process's limit as it was when they were made."""
    from PIL import Image

    from qkhooks import stream
    from qkhooks.data import sources

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # the user's, in the main process
    loader = stream._loader(["a", "b"], range(2), 1, 1, None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # what a spawned worker's PIL starts with
    loader.worker_init_fn(0)
    assert Image.MAX_IMAGE_PIXELS == 200_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    sources._set_worker_stream(None, 200_000)  # the streamed sources' pool initializer, given the main's limit
    assert Image.MAX_IMAGE_PIXELS == 200_000 and sources._WORKER_STREAM is None


_SPAWNED_RUN = """
import sys, warnings
from pathlib import Path
import numpy as np, torch.multiprocessing as mp
from PIL import Image
import qkhooks
if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    warnings.simplefilter("ignore")
    tmp = Path(sys.argv[1]); (tmp / "imgs").mkdir()
    Image.fromarray(np.zeros((1, 400, 3), np.uint8)).save(tmp / "imgs" / "strip.png")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp / "imgs" / "photo.png")
    Image.MAX_IMAGE_PIXELS = 200_000
    loaded = qkhooks.load_model("timm:vit_tiny_patch16_224@random")
    for workers in (0, 1):
        res = qkhooks.record_dataset(loaded, str(tmp / "imgs"), tmp / f"run{workers}.h5", layers="0", modes=2,
                                     batch_size=1, progress=False, num_workers=workers)
        with qkhooks.open_run(tmp / f"run{workers}.h5") as r:
            print(workers, r.ids, [s[0] for s in res.skipped])
"""


@pytest.mark.slow
def test_a_spawned_worker_skips_what_the_main_process_skips(tmp_path):
    """The same end to end, with spawned DataLoader workers (macOS's default, Linux's from Python 3.14)."""
    import subprocess
    import sys

    script = tmp_path / "spawned.py"
    script.write_text(_SPAWNED_RUN)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                         check=True).stdout.splitlines()
    assert out == ["0 ['photo.png'] ['strip.png']", "1 ['photo.png'] ['strip.png']"]


@pytest.mark.parametrize("damage", ["garbage start", "zeroed start", "cut to 5 bytes"])
def test_a_damaged_run_is_still_called_damaged_not_a_file_of_another_kind(tmp_path, damage):
    """A run whose first bytes were overwritten with other bytes (or zeroed, or a run cut short inside its signature)
    is a damaged run that `qkhooks repair` can recover, not 'not HDF5 at all' (review r35 C: the round's first
    refusal of files that are no run took the overwritten start for a text file's). --resume names the repair;
    --overwrite replaces it."""
    from qkhooks.store import RunWriter

    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32") as w:
        w.write_batch(["a", "b"], {"v": np.ones((2, 3), np.float32)})
    data = bytearray(path.read_bytes())
    if damage == "garbage start":
        data[:8] = b"GARBAGE!"
    elif damage == "zeroed start":
        data[:48] = bytes(48)
    else:
        data = data[:5]
    path.write_bytes(bytes(data))
    with pytest.raises(qkhooks.QKHooksError, match=r"cannot resume .*run\.h5: it is damaged .*qkhooks repair"):
        RunWriter(path, mode="resume")
    with RunWriter(path, mode="overwrite", dtype="float32") as w:
        w.write_batch(["c"], {"v": np.zeros((1, 3), np.float32)})
    with qkhooks.open_run(path) as run:
        assert run.ids == ["c"]


def test_interruption_help_names_each_state_of_the_file(tmp_path):
    """Every branch of RunWriter.interruption_help: nothing written, a checkpoint unknown, all kept, some redone, and
    an --overwrite that has not replaced the old run yet."""
    from qkhooks.store import RunWriter

    path = tmp_path / "run.h5"
    with RunWriter(path, dtype="float32") as w:
        assert w.interruption_help(None) == (f"nothing was recorded (no image was committed), so no file is left at "
                                             f"{path}; run the same command again.")
        w.write_batch(["a", "b", "c"], {"v": np.ones((3, 2), np.float32)})
        w.flush()
        assert w.interruption_help(3) == f"{path} keeps 3 committed images; the same command with --resume continues after them."
        assert w.interruption_help(None) == (f"{path} keeps 3 committed images; the same command with --resume "
                                             "continues from its reducers' last checkpoint.")
        assert w.interruption_help(1).startswith(f"{path} keeps 3 committed images, 1 of them in its reducers' last "
                                                 "checkpoint: the same command with --resume continues after those 1 "
                                                 "and records the 2 after them again")
    with RunWriter(path, mode="overwrite", dtype="float32") as w:  # the old run is replaced only at a checkpoint
        w.write_batch(["d"], {"v": np.ones((1, 2), np.float32)})
        w.flush()
        assert w.interruption_help(0) == (f"{path} still holds the old run, unchanged (the new one is dropped); run "
                                          "the command again.")


@pytest.mark.parametrize("mode", ["read", "overwrite", "resume"])
def test_a_fifo_given_as_a_run_is_refused_without_being_opened(tmp_path, mode):
    """Opening a FIFO for reading waits for a writer forever: reading a 'run' at a FIFO's path hung (its first bytes
    were read to tell a run from a photo), and the new check of a file to overwrite or resume would have too. It is
    refused as not a regular file; the test runs in a thread so that a hang fails it instead of stalling the suite."""
    import os
    import threading

    from qkhooks.store import RunWriter

    path = tmp_path / "run.h5"
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            if mode == "read":
                qkhooks.open_run(path)
            else:
                RunWriter(path, mode=mode)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # free the blocked open, then fail
        with open(path, "wb"):
            pass
        pytest.fail(f"{mode}: opening a FIFO as a run hung")
    (error,) = outcome
    assert isinstance(error, qkhooks.QKHooksError)
    assert "not a regular file (a FIFO, a device or a socket)" in str(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]  # no lock file or half-made run left
