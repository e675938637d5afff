"""Round 40, a first-time user's review: messages that sent a researcher the wrong way.

- `qkhooks merge RUN.h5` on a run of one process said "RUN.h5 already exists; pass --overwrite": the way out it
  named was to replace a finished run, where the run needed no merge at all (no shards next to it).
- `qkhooks compare` named its arguments RUN_OR_MODEL, yet refuses run files: it reads report folders. Given a
  run file it said only "neither a report folder nor a model spec".
- The BFD sentences that do not read the position probes said "one image in holdout_every is held out", a Python
  name with no value; they name the flag, its default and how the images are chosen.
"""
from __future__ import annotations

import hashlib

import pytest

import qkhooks
from qkhooks.analysis.bfd import format_table
from qkhooks.analysis.bfd_summary import MIN_HOLDOUT, paper_claims
from qkhooks.cli import main
from qkhooks.compare import compare
from qkhooks.distributed import merge_shards


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_of_a_run_without_shards_says_it_needs_no_merge_and_leaves_it(tmp_path, capsys):
    run = tmp_path / "photos.h5"
    run.write_bytes(b"a finished single-process run")  # the message comes before anything reads it
    before = _digest(run)
    with pytest.raises(qkhooks.QKHooksError, match="needs no merge") as err:
        merge_shards(run)
    assert "--overwrite" not in str(err.value)  # replacing the run is not the way out
    assert main(["merge", str(run)]) != 0
    assert "needs no merge" in capsys.readouterr().err
    assert _digest(run) == before


def test_merge_over_an_existing_file_with_shards_beside_it_still_asks_for_overwrite(tmp_path):
    run = tmp_path / "photos.h5"
    run.write_bytes(b"an earlier merge")
    (tmp_path / "photos.rank0-of-2.h5").write_bytes(b"shard")
    with pytest.raises(qkhooks.QKHooksError, match="already exists; pass overwrite=True"):
        merge_shards(run)


def test_compare_names_its_arguments_reports_and_says_a_run_file_is_not_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    usage = capsys.readouterr().out
    assert "REPORT_OR_MODEL" in usage and "RUN_OR_MODEL" not in usage
    run = tmp_path / "photos.h5"
    run.write_bytes(b"a run file")
    with pytest.raises(qkhooks.QKHooksError, match=r"not run files \(\.h5\) of `qkhooks record`"):
        compare([str(run), "timm:vit_tiny_patch16_224@random"], tmp_path / "out")
    with pytest.raises(qkhooks.QKHooksError) as err:  # a word that is no file keeps the plain message
        compare(["nonsense", "timm:vit_tiny_patch16_224@random"], tmp_path / "out")
    assert "run files" not in str(err.value)


def _bfd_result(held: int) -> dict:
    head = {"head": 0, "frobenius": {"energy": {"CC": 0.7, "CP": 0.2, "PC": 0.05, "PP": 0.05}, "label": "CC"},
            "energy": {"CC": 0.7, "CP": 0.2, "PC": 0.05, "PP": 0.05}}
    layer = {"layer": 0, "heads": [head], "position_variance_share": 0.2, "coupling": 0.25, "interference": 0.0,
             "global_mean_share": 0.1, "energy": {"CC": 0.7, "CP": 0.2, "PC": 0.05, "PP": 0.05},
             "decoding": {"holdout_images": held, "X": {"mean": 0.5}, "P": {"mean": 0.95}, "C": {"mean": 0.05}}}
    return {"definition": "frobenius", "images": 5 * max(held, 1), "model": "m", "layers": [layer]}


def test_bfd_sentences_that_do_not_read_the_probes_name_the_flag_and_how_images_are_held_out():
    few = _bfd_result(MIN_HOLDOUT - 1)
    for text in (paper_claims(few)["sentences"][-1], format_table(few)):
        assert "--holdout-every" in text and "default 5" in text and "hash of its id" in text, text
        assert "one image in holdout_every" not in text
    enough = _bfd_result(MIN_HOLDOUT)  # read: no such sentence
    assert "--holdout-every" not in paper_claims(enough)["sentences"][-1]
    assert "--holdout-every" not in format_table(enough)


def test_analyze_modes_table_says_why_p_same_is_a_dash(tmp_path, capsys):
    """`qkhooks analyze modes` on photos without object masks printed a column of dashes under p_same and no word
    why; modes.json had the reason. The printed table now carries it under the rows."""
    import timm

    net = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=16,
                            depth=2, num_heads=2).eval()
    run = tmp_path / "photos.h5"
    qkhooks.record_dataset(net, "samples", run, modes=2, limit=3, batch_size=3, progress=False)
    assert main(["analyze", "modes", str(run), "--out", str(tmp_path / "m"), "--no-images", "--figure-modes", "0",
                 "--no-overview"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.split() and line.split()[0].isdigit()]
    assert [line.split()[0] for line in rows] == ["0", "1"] and all(line.split()[-1] == "—" for line in rows)
    assert "p_same —: the run has no masks/objects (record a dataset with object masks)." in lines
