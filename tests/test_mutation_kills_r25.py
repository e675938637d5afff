"""Kill tests for the mutants of round 24's code that its own tests let survive (module "round25" of
tests/mutation.py, ``--only ROUND24``; tests/MUTATION.md's round-25 section names each); each checks a behaviour a
user relies on against an independent reference (hashlib's digests, h5py's own reading of the file, the whole
message a user reads). The last test keeps the harness's round25 module consistent with the code it names."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
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

from test_ids_checksum import blake2b_rows, ids_of, write

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ repair/verify: the ids' digests
def test_verify_says_whole_which_parts_a_checksum_covers_with_and_without_the_ids_digests(tmp_path):
    """The two checksum lines and result lines of ``qkhooks info --verify`` for a checksummed run, with the ids'
    digests (round 24's runs) and without (a checksummed run written before them): what is covered, word for word."""
    path = tmp_path / "run.h5"
    write(path, batches=2)
    lines = verify_run(path).summary().splitlines()
    assert lines[1] == f"format   {fmt.FORMAT}"  # since round 27, under the verify line
    assert lines[4:] == ["checksum Fletcher-32 on every per-image array and on the image ids: every chunk read was "
                         "checked against it, every id against its digest",
                         "attrs    sha256 digests: every attribute checked against its own",  # round 39
                         "reducers no saved state",
                         "result   every part read, every chunk passed its checksum and every id its digest"]
    with h5py.File(path, "r+") as f:
        del f[fmt.ID_DIGESTS]
    lines = verify_run(path).summary().splitlines()
    assert lines[4:] == ["checksum Fletcher-32 on every per-image array, not on the image ids (written before qkhooks "
                         "stored their digests): every chunk read was checked against it; a changed id cannot be "
                         "detected", "attrs    sha256 digests: every attribute checked against its own",
                         "reducers no saved state",
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



@pytest.mark.parametrize("changed", [[6], [6, 9]], ids=["one", "two"])
def test_an_id_off_its_digest_is_refused_quoting_the_id_as_the_file_holds_it(tmp_path, changed):
    """The refusal quotes the changed id as HDF5 reads it now (h5py's own reading, undecodable bytes replaced), so a
    user can find it, and counts the others that changed."""
    from qkhooks.store import open_run

    from test_ids_checksum import flip_in_id

    path = tmp_path / "run.h5"
    written = write(path)
    for image in changed:
        flip_in_id(path, written[image], 0x80)
    with h5py.File(path, "r") as f:
        held = f[fmt.IDS][changed[0]].decode("utf-8", errors="replace")
    assert held != written[changed[0]]
    with open_run(path) as run, pytest.raises(QKHooksError) as refused:
        run.ids
    more = ", nor do those of 1 more" if len(changed) > 1 else ""
    assert (f"image {changed[0]}'s id, read as {held!r}, does not match its digest in /{fmt.ID_DIGESTS}{more}: it "
            "changed on disk, so that image is lost (repair leaves it out; recording the run again restores it)"
            ) in str(refused.value)


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


def test_a_buffer_reinterpreted_as_another_dtype_in_place_changes_the_fingerprint():
    """A buffer replaced by a view of its own bytes as another dtype (same storage, pointer, shape and version: only
    the dtype tells) is other weights: the fingerprint follows, equal to a fresh copy's (whose storage is new)."""
    import copy

    import torch
    from torch import nn

    from qkhooks.stream import weights_fingerprint

    net = nn.Module()
    net.register_buffer("table", torch.arange(6, dtype=torch.float32))
    before = weights_fingerprint(net)
    net.table = net.table.view(torch.int32)
    after = weights_fingerprint(net)
    assert after != before and after == weights_fingerprint(copy.deepcopy(net))


def test_extra_state_is_fingerprinted_by_its_pickle_as_documented_and_follows_its_content():
    """A module's extra state that is neither a tensor nor a plain value (a dict, from ``get_extra_state``) is hashed
    by its pickle (protocol 4, so a run's stored fingerprint stays the one a later qkhooks computes on resume): the
    whole fingerprint against hashlib and pickle directly, and a change of the state changes it."""
    import pickle

    import torch
    from torch import nn

    from qkhooks.stream import weights_fingerprint

    class Calibrated(nn.Module):
        def __init__(self, offset: float) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.arange(3, dtype=torch.float32))
            self.calibration = {"offset": offset, "source": "bench"}

        def get_extra_state(self):
            return self.calibration

        def set_extra_state(self, state) -> None:
            self.calibration = state

    def reference(net: nn.Module) -> str:
        digests = []
        for name, value in sorted(net.state_dict().items()):
            if isinstance(value, torch.Tensor):
                h = hashlib.sha256(f"{name}|{tuple(value.shape)}|{value.dtype}|".encode())
                h.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h = hashlib.sha256(f"{name}|".encode() + pickle.dumps(value, protocol=4))
            digests.append(h.digest())
        return hashlib.sha256(b"".join(digests)).hexdigest()

    net = Calibrated(0.5)
    assert sorted(net.state_dict()) == ["_extra_state", "weight"]
    assert weights_fingerprint(net) == reference(net)
    assert weights_fingerprint(Calibrated(0.25)) == reference(Calibrated(0.25)) != weights_fingerprint(net)


def test_state_that_cannot_be_fingerprinted_is_refused_whole():
    """The refusal names the entry and its type, why (with pickle's own error) and the fix."""
    from test_quantised_head_fingerprint import _WithExtraState

    from qkhooks.stream import weights_fingerprint

    import pickle

    model = _WithExtraState()
    with pytest.raises(Exception) as unpicklable:  # pickle's own words for the same state
        pickle.dumps(model.get_extra_state(), protocol=4)
    cause = str(unpicklable.value)
    with pytest.raises(QKHooksError) as refused:
        weights_fingerprint(model)
    assert str(refused.value) == ("the model's state dict holds '_extra_state', a _Opaque that can be neither hashed as a tensor "
                       f"nor pickled ({cause}), so a run file cannot record which weights it was made with (a resume "
                       "compares them). Record the model without that state (it comes from the module's "
                       "get_extra_state).")


# ------------------------------------------------------------------------------------ capture.attach through own_hook
def test_a_windowed_model_recorded_once_through_qkhooks_own_hooks_gives_its_eager_outputs_and_maps():
    """Round 24 put every hook a recording registers through ``own_hook`` (torch's options handed on): a windowed
    model (Swin: each block's token grid read by a context pre-hook with kwargs) recorded with ``outputs="eager"``
    (each attention computed once: a pre-hook and an always-called forward hook on it) gives the model's own eager
    output and eager attention maps (test_zoo's references), as before."""
    import torch

    import qkhooks
    from test_full_once import _case, _eager_forward
    from test_zoo import _call, _first_tensor, eager_maps, perturb

    case = _case("swin_tiny_patch4_window7_224")
    torch.manual_seed(0)
    model, inputs = perturb(case.build()), case.inputs()
    sites = qkhooks.sites(model)
    assert all(site.context_hooks() for site in sites)  # what this test is about: hooks besides the site's own
    want_maps = eager_maps(model, sites, inputs, case.kind)
    want_out = _eager_forward(model, case.kind, lambda: _first_tensor(_call(model, inputs)))
    with qkhooks.record(model, modes=None, attention="full", outputs="eager") as run:
        out = _first_tensor(_call(model, inputs))
    assert run.outputs == "eager" and float((out - want_out).abs().max()) < 1e-5
    for site, want in zip(sites, want_maps):
        assert float((run.attention(site.layer, "full").reshape(want.shape) - want).abs().max()) < 1e-5, site.path


# ------------------------------------------------------------------------------------ models/unsupported.py: refusals
COMPILED_HARM = ("the compiled graph runs the hooks qkhooks reads q, k and the tokens with only while it is traced, or "
                 "not at all, so the recording would be empty or stale without a word.")
QUANTISED_WHY = ("from torch.ao.quantization.quantize_dynamic or convert) in an attention layer: it computes with "
                 "integer weights, so there are no float W_q/W_k whose products the model computes. Record the float "
                 "model (before quantising it), or quantise only layers outside the attention (the head, the MLPs: "
                 "those are taken).")


@pytest.mark.parametrize("how", ["model.compile", "wrapper"])
def test_a_whole_model_compiled_before_entry_is_refused_whole_naming_the_model_and_the_fix(how):
    """Compiled whole before ``record()`` (``model.compile()``, or a ``torch.compile`` wrapper handed over): refused at
    entry naming the model's own class (the wrapper's, whose ``_orig_mod`` is what to record), the harm and the fix."""
    import torch

    import qkhooks
    from test_wrapped_qk_layers_and_half_precision import _timm_vit

    torch._dynamo.reset()
    model = _timm_vit()
    if how == "model.compile":
        model.compile(backend="eager")
        want = ("the model (VisionTransformer) is compiled by torch.compile (module.compile()) where qkhooks hooks the "
                f"attention: {COMPILED_HARM} To record it, record the model uncompiled (load or build it again without "
                ".compile(); compile only what runs without qkhooks, such as the head).")
    else:
        model = torch.compile(model, backend="eager")
        want = ("the model (OptimizedModule) is compiled by torch.compile (a compiled wrapper) where qkhooks hooks the "
                f"attention: {COMPILED_HARM} To record it, record model._orig_mod and run that module itself (the "
                "wrapper runs the compiled graph around it).")
    with pytest.raises(QKHooksError) as refused:
        qkhooks.record(model, modes=4)
    assert str(refused.value) == want


def test_a_quantised_qk_layer_is_refused_whole():
    import qkhooks
    from test_torch_compile import _refused_model

    with pytest.raises(QKHooksError) as refused:
        qkhooks.record(_refused_model("quantised qkv"), modes=4)
    assert str(refused.value) == ("'blocks.1.attn.qkv' (Linear) is a quantised layer (torch.ao.nn.quantized.dynamic."
                                  f"modules.linear.Linear, {QUANTISED_WHY}")


def test_a_quantised_module_that_is_itself_the_attention_checked_is_named_as_the_model():
    """A module handed over whole whose own path ("") is the attention checked (a bare attention module recorded has
    path ""): the refusal names it as the model, with its class."""
    import warnings

    from torch.ao.nn.quantized import dynamic

    from qkhooks.models.unsupported import refuse_quantised

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = dynamic.Linear(4, 4)
    with pytest.raises(QKHooksError) as refused:
        refuse_quantised(layer, [""])
    assert str(refused.value) == ("the model (Linear) is a quantised layer (torch.ao.nn.quantized.dynamic.modules.linear."
                                  f"Linear, {QUANTISED_WHY}")


# ------------------------------------------------------------------------------------ tests/mutation.py: round25
def _harness():
    """tests/mutation.py, in a git checkout of the project (its commit ranges and blame need one; a mutation run's
    copy of the project under .mutation/ is not one: skipped there)."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT.resolve():
        pytest.skip("not a git checkout of the project")
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    known = subprocess.run(["git", "cat-file", "-e", "30068a4^{commit}"], cwd=ROOT, capture_output=True)
    if shallow.stdout.strip() == "true" or known.returncode != 0:  # blame and commit ranges need round 24's history
        pytest.skip("a clone without the project's history (shallow)")
    return _mutation_module()


def _mutation_module():
    """tests/mutation.py, imported (it needs no git to import)."""
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
    assert listed.returncode == 0 and len(listed.stdout.split()) == 14  # round 24's commits, 30068a4 excluded


# A module in three commits: A writes it, B changes one line of alpha (between two of A's), C one line of beta.
_MODULE_A = ['"""A module of a throwaway repository."""', "", "", "def alpha(x):", "    a = x + 1", "    b = a * 2",
             "    return b", "", "", "def beta(y):", "    c = y - 1", "    return c", ""]
_MODULE_B = [line.replace("a * 2", "a * 3") for line in _MODULE_A]
_MODULE_C = [line.replace("y - 1", "y - 5") for line in _MODULE_B]
# mutant -> (function, the line it changes, as it reads mutated)
_MUTANTS = {"1": ("alpha", "    a = x + 1", "    a = x - 1"),  # A's line, just above B's
            "2": ("alpha", "    b = a * 3", "    b = a / 3"),  # B's line
            "3": ("alpha", "    return b", "    return None"),  # A's line, just below B's
            "4": ("beta", "    c = y - 5", "    c = y + 5"),  # C's line
            "5": ("beta", "    return c", "    return None")}  # A's line, just below C's


def _throwaway_repository(root: Path, first: bool = True) -> dict[str, str]:
    """``root`` made a git repository holding pkg/mod.py in the three commits A, B, C, after a first one of another
    file unless ``first`` is False (then A is the root commit); their hashes by name."""
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    for inherited in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):  # set when pytest runs inside a git hook
        env.pop(inherited, None)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (root / "pkg").mkdir()
    hashes = {}
    commits = [("root", "README", ["a throwaway repository"])] * first + [
        ("A", "pkg/mod.py", _MODULE_A), ("B", "pkg/mod.py", _MODULE_B), ("C", "pkg/mod.py", _MODULE_C)]
    for name, path, lines in commits:
        (root / path).write_text("\n".join(lines))
        git("add", path)
        git("commit", "-q", "--no-gpg-sign", "-m", name)
        hashes[name] = git("rev-parse", "HEAD").strip()
    return hashes


def _mutants_folder(work: Path) -> None:
    """``work``/mutants in mutmut's layout for pkg/mod.py as commit C leaves it: a header, then each function's
    unmutated copy (``x_NAME__mutmut_orig``) and its mutants' copies, one ``.spans`` entry [first, last] (1-based)
    per copy; the copies sit at other line numbers than the functions in the source."""
    source = _MODULE_C
    text = ["import os  # mutmut's trampolines and imports come first", "import sys", "", "", "", ""]
    spans = {}

    def add(copy_name: str, lines: list[str]) -> None:
        spans[copy_name] = [len(text) + 1, len(text) + len(lines)]
        text.extend(lines + ["", ""])

    for function in ("alpha", "beta"):
        first = next(i for i, line in enumerate(source) if line.startswith(f"def {function}("))
        body = source[first:source.index("", first)]  # the def and its lines, up to the blank line after them
        add(f"x_{function}__mutmut_orig", [body[0].replace(f"def {function}(", f"def x_{function}__mutmut_orig(")]
            + body[1:])
        for number, (owner, line, mutated) in _MUTANTS.items():
            if owner == function:
                assert line in body, (function, line)
                add(f"x_{function}__mutmut_{number}",
                    [body[0].replace(f"def {function}(", f"def x_{function}__mutmut_{number}(")]
                    + [mutated if l == line else l for l in body[1:]])
    folder = work / "mutants" / "pkg"
    folder.mkdir(parents=True)
    (folder / "mod.py").write_text("\n".join(text) + "\n")
    (folder / "mod.py.spans").write_text(json.dumps({"version": 1, "spans": spans}))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_written_by_places_each_mutant_on_the_source_line_it_changes(tmp_path):
    """:func:`mutation.written_by` against a throwaway git repository (pkg/mod.py in three commits A, B, C, each
    changing one line between lines of A) and a hand-made mutants folder in mutmut's layout: for a commit range it
    names exactly the mutants on lines those commits wrote and the later ones left as they were, never a mutant a
    line above or below, nor one on a line of a commit outside the range."""
    mutation = _mutation_module()
    repo, work = tmp_path / "repo", tmp_path / "work"
    repo.mkdir()
    commit = _throwaway_repository(repo)
    _mutants_folder(work)
    named = {f"pkg.mod.x_{function}__mutmut_{number}" for number, (function, _, _) in _MUTANTS.items()}
    assert mutation.written_by(work, f"{commit['A']}..{commit['B']}", repo) == {"pkg.mod.x_alpha__mutmut_2"}
    assert mutation.written_by(work, f"{commit['B']}..{commit['C']}", repo) == {"pkg.mod.x_beta__mutmut_4"}
    assert mutation.written_by(work, f"{commit['A']}..{commit['C']}", repo) == {"pkg.mod.x_alpha__mutmut_2",
                                                                                   "pkg.mod.x_beta__mutmut_4"}
    assert mutation.written_by(work, commit["C"], repo) == named  # A, B and C: every mutated line is theirs
    assert mutation.written_by(work, f"{commit['root']}..{commit['A']}", repo) == {  # B and C rewrote two of A's
        "pkg.mod.x_alpha__mutmut_1", "pkg.mod.x_alpha__mutmut_3", "pkg.mod.x_beta__mutmut_5"}
    assert mutation.written_by(work, f"{commit['C']}..{commit['C']}", repo) == set()
    # lines of a root commit: git blame marks them "^" plus 39 hex digits unless told --root
    rooted = tmp_path / "rooted"
    rooted.mkdir()
    assert mutation.written_by(work, _throwaway_repository(rooted, first=False)["A"], rooted) == {
        "pkg.mod.x_alpha__mutmut_1", "pkg.mod.x_alpha__mutmut_3", "pkg.mod.x_beta__mutmut_5"}
