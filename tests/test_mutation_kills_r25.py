"""Kill tests for the mutants of round 24's code that its own tests let survive (module "round25" of
tests/mutation.py, ``--only ROUND24``; tests/MUTATION.md's round-25 section names each); each checks a behaviour a
user relies on against an independent reference (hashlib's digests, h5py's own reading of the file, the whole
message a user reads). The last test keeps the harness's round25 module consistent with the code it names."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from qkhooks.errors import QKHooksError
from qkhooks.store import RunWriter, repair, verify_run
from qkhooks.store import format as fmt

from test_ids_checksum_r24 import blake2b_rows, ids_of, write

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ repair/verify: the ids' digests
def test_verify_says_whole_which_parts_a_checksum_covers_with_and_without_the_ids_digests(tmp_path):
    """The two checksum lines and result lines of ``qkhooks info --verify`` for a checksummed run, with the ids'
    digests (round 24's runs) and without (a checksummed run written before them): what is covered, word for word."""
    path = tmp_path / "run.h5"
    write(path, batches=2)
    lines = verify_run(path).summary().splitlines()
    assert lines[3:] == ["checksum Fletcher-32 on every per-image array and on the image ids: every chunk read was "
                         "checked against it, every id against its digest", "reducers no saved state",
                         "result   every part read, every chunk passed its checksum and every id its digest"]
    with h5py.File(path, "r+") as f:
        del f[fmt.ID_DIGESTS]
    lines = verify_run(path).summary().splitlines()
    assert lines[3:] == ["checksum Fletcher-32 on every per-image array, not on the image ids (written before qkhooks "
                         "stored their digests): every chunk read was checked against it; a changed id cannot be "
                         "detected", "reducers no saved state",
                         "result   every part read, every chunk passed its checksum (the ids carry none)"]


def test_repair_of_a_run_whose_digests_were_cut_short_names_the_cut_and_keeps_the_vouched_images(tmp_path):
    """Digests cut shorter than the ids (an h5py edit, a cut): the images past the digests' end are not vouched for,
    so they are lost, and the report names the cut as it names a cut array."""
    path = tmp_path / "run.h5"
    written = write(path, batches=3)  # 12 images
    with h5py.File(path, "r+") as f:
        f[fmt.ID_DIGESTS].resize(9, axis=0)
    fixed = repair(path, tmp_path / "fixed.h5")
    assert fixed.lost == [9, 10, 11] and fixed.recovered == written[:9]
    assert f"/{fmt.ID_DIGESTS}: rows 9-11 are past its end (it has 9 rows, 12 images are committed)" in fixed.problems
    with h5py.File(tmp_path / "fixed.h5", "r") as f:
        assert np.array_equal(f[fmt.ID_DIGESTS][()], blake2b_rows(written[:9]))


def test_a_digest_chunk_of_several_images_that_fails_its_checksum_is_named_as_one_span_and_only_its_images_lost(
        tmp_path):
    """Digests laid out four images a chunk (``chunk_images=4``): a flipped bit fails that chunk's checksum, and verify
    and repair name its four rows as one span (the chunk), read around it chunk by chunk, and keep every other image."""
    path = tmp_path / "run.h5"
    written = write(path, batches=3, chunk_images=4)
    with h5py.File(path, "r") as f:
        assert f[fmt.ID_DIGESTS].chunks == (4, fmt.ID_DIGEST_BYTES)
        info = f[fmt.ID_DIGESTS].id.get_chunk_info_by_coord((4, 0))
    with open(path, "r+b") as fh:  # one bit of the second chunk's data (images 4-7)
        fh.seek(info.byte_offset + 21)
        byte = fh.read(1)[0]
        fh.seek(info.byte_offset + 21)
        fh.write(bytes([byte ^ 0x10]))
    report = verify_run(path)
    assert report.damaged == {fmt.ID_DIGESTS: [(4, 8)]}
    assert any(line.startswith(f"/{fmt.ID_DIGESTS}: rows 4-7 do not read (") for line in report.problems)
    fixed = repair(path, tmp_path / "fixed.h5")
    assert fixed.lost == [4, 5, 6, 7] and fixed.recovered == written[:4] + written[8:]


# ------------------------------------------------------------------------------------ store/lock.py: another process
HOLDER = textwrap.dedent("""
    import fcntl, json, os, socket, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    note = {"pid": os.getpid(), "host": socket.gethostname(), "since": "2026-12-05T10:00:00+00:00"}
    if sys.argv[2] == "note":  # as a writer's lock file says who holds it; "none": taken, its note not yet written
        os.pwrite(fd, (json.dumps(note) + "\\n").encode(), 0)
    print(note["pid"], flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("note", ["note", "none"])
def test_a_writer_refused_by_another_processs_lock_says_another_process_and_who(tmp_path, note):
    """The lock held by another process (a plain flock on RUN.h5.lock, as a writer takes it, with or without its note
    written yet): the refusal says another process, names it from the note, and says to wait or stop it, never to
    close a writer of this process."""
    out = tmp_path / "run.h5"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, f"{out}.lock", note], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        pid = int(holder.stdout.readline())
        with pytest.raises(QKHooksError) as refused:
            RunWriter(out)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    who = (f"pid {pid} on {socket.gethostname()}, since 2026-12-05T10:00:00+00:00" if note == "note"
           else "pid and host not yet written")
    assert str(refused.value) == (f"{out} is being written by another process ({who}); wait for it to finish or stop "
                                  "it, then run again (a dead writer's lock is released by the system).")


# ------------------------------------------------------------------------------------ stream.weights_fingerprint
def test_a_second_fingerprint_of_an_unchanged_model_hashes_nothing_and_a_changed_one_is_hashed_again(monkeypatch):
    """The fingerprint is kept per model while no tensor changes (ViT-L: 3 s of hashing a call, once per
    ``record_dataset``); the tensors are hashed again once one changes, giving a fresh copy's fingerprint (hashlib's
    sha256 of each entry, counted here)."""
    import copy

    import torch
    from torch import nn

    from qkhooks.stream import weights_fingerprint

    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    calls: list[int] = []
    sha256 = hashlib.sha256

    def counted(*args, **kwargs):
        calls.append(1)
        return sha256(*args, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counted)
    first = weights_fingerprint(net)
    assert len(calls) == len(net.state_dict()) + 1  # one a tensor, one over their digests
    calls.clear()
    assert weights_fingerprint(net) == first and calls == []
    with torch.no_grad():
        net[1].bias.add_(1.0)
    changed = weights_fingerprint(net)
    assert len(calls) == len(net.state_dict()) + 1
    assert changed != first and changed == weights_fingerprint(copy.deepcopy(net))


# ------------------------------------------------------------------------------------ tests/mutation.py: round25
def _harness():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import mutation
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return mutation


def test_the_round25_module_names_files_tests_and_functions_that_exist():
    """The harness's module "round25" and its named set ROUND24: every file to mutate and every test file exists, the
    selection names only test files it selects, ``weights_fingerprint`` (named by pattern) is a function of the file
    mutated, and the commit range resolves in this checkout (``git rev-list``), so ``--only ROUND24`` draws the same
    sample wherever it runs."""
    mutation = _harness()
    files, tests, select = mutation.MODULES["round25"]
    assert all((ROOT / f).is_file() for f in files) and all((ROOT / t).is_file() for t in tests)
    stems = {Path(t).stem for t in tests}
    assert {w for w in select.replace("(", " ").replace(")", " ").split() if w.startswith("test_")} <= stems
    assert mutation.NAMED_SETS["ROUND24"] == mutation.ROUND24
    patterns = [p for p in mutation.ROUND24 if not p.startswith(mutation.COMMITS)]
    for pattern in patterns:  # qkhooks.stream.x_weights_fingerprint__* -> a def in qkhooks/stream.py
        module, _, function = pattern.rpartition(".")
        path = ROOT / (module.replace(".", "/") + ".py")
        assert f"qkhooks/{path.relative_to(ROOT / 'qkhooks')}" in files
        defined = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
        assert function.removeprefix("x_").removesuffix("__*") in defined
    (revs,) = [p[len(mutation.COMMITS):] for p in mutation.ROUND24 if p.startswith(mutation.COMMITS)]
    listed = subprocess.run(["git", "rev-list", revs], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0 and "not a git repository" in listed.stderr:
        pytest.skip("not a git checkout")
    assert listed.returncode == 0 and len(listed.stdout.split()) == 14  # round 24's commits, 30068a4 excluded


def test_written_by_places_each_mutant_on_the_source_line_it_changes(tmp_path):
    """:func:`mutation.written_by` against a hand-made mutants folder in mutmut's layout (a ``.spans`` file of line
    ranges per function copy): a mutant on a line the given commits wrote is named, one on an older line is not. The
    file and its commits are this checkout's own: qkhooks/store/format.py's ``id_datasets`` (round 24's) and
    ``remove_run`` (older; an edit to either line moves this test's ground)."""
    mutation = _harness()
    source = (ROOT / "qkhooks/store/format.py").read_text().splitlines()
    def copy_of(name: str, suffix: str, edit=None) -> list[str]:
        first = next(i for i, line in enumerate(source) if line.startswith(f"def {name}("))
        last = next(i for i in range(first + 1, len(source)) if source[i] and not source[i][0].isspace())
        lines = [source[first].replace(f"def {name}(", f"def x_{name}__mutmut_{suffix}(")] + source[first + 1:last]
        return edit(lines) if edit else lines
    copies = {"id_datasets": copy_of("id_datasets", "orig"), "id_datasets_1": copy_of(
        "id_datasets", "1", lambda ls: [l.replace("[f[IDS]]", "[None]") for l in ls]),
        "remove_run": copy_of("remove_run", "orig"), "remove_run_1": copy_of(
        "remove_run", "1", lambda ls: [ls[0]] + [l.replace("missing_ok=True", "missing_ok=False") for l in ls[1:]])}
    assert copies["id_datasets_1"] != copies["id_datasets"] and copies["remove_run_1"] != copies["remove_run"]
    text, spans = [], {}
    for key, lines in copies.items():
        name = lines[0].split("def ", 1)[1].split("(", 1)[0]
        spans[name] = [len(text) + 1, len(text) + len(lines)]
        text += lines
    mutants = tmp_path / "mutants" / "qkhooks" / "store"
    mutants.mkdir(parents=True)
    (mutants / "format.py").write_text("\n".join(text) + "\n")
    (mutants / "format.py.spans").write_text(json.dumps({"version": 1, "spans": spans}))
    assert mutation.written_by(tmp_path, "30068a4..a5476db") == {"qkhooks.store.format.x_id_datasets__mutmut_1"}
