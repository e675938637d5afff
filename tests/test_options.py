"""RecordOptions is the one definition of the recording options: the ``qkhooks record`` flags, the keywords of
``record_dataset`` and the run file's ``config`` attribute all come from it, and a stored config gives the options back."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json

import pytest

import qkhooks
from qkhooks.cli import main
from qkhooks.cli.record import _record_args
from qkhooks.errors import QKHooksError
from qkhooks.options import RecordOptions
from qkhooks.store import open_run
from qkhooks.stream import record_dataset

SPEC = "timm:vit_tiny_patch16_224"
DATA = "o3:6:1"
FLAGS = ["--modes", "4", "--layers", "0,2", "--attention", "rows:2", "--input", "residual", "--augmented",
         "--dtype", "float32", "--compression", "gzip", "--batch-size", "3", "--limit", "2"]
SAME = RecordOptions(modes=4, layers=[0, 2], attention="rows:2", input="residual", augmented=True, dtype="float32",
                     compression="gzip", batch_size=3, limit=2)


def parse_record(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _record_args(parser)
    return parser.parse_args([SPEC, DATA, "--out", "run.h5", *argv])


def test_the_record_flags_make_the_options_and_their_defaults_are_the_api_defaults():
    assert RecordOptions.from_args(parse_record()) == RecordOptions()
    assert RecordOptions.from_args(parse_record(*FLAGS)) == dataclasses.replace(SAME, layers="0,2")
    assert RecordOptions.from_args(parse_record("--modes", "all", "--workers", "2")) == RecordOptions(modes="all",
                                                                                                      num_workers=2)


def test_record_dataset_takes_every_option_as_a_keyword_with_the_same_default():
    parameters = inspect.signature(record_dataset).parameters
    for field in dataclasses.fields(RecordOptions):
        assert parameters[field.name].kind is inspect.Parameter.KEYWORD_ONLY, field.name
        assert parameters[field.name].default == field.default, field.name


def test_options_and_the_same_keywords_together_are_refused_before_any_work(tmp_path):
    with pytest.raises(QKHooksError, match="modes given both"):
        record_dataset("no-such-model", DATA, tmp_path / "x.h5", options=RecordOptions(modes=4), modes=8)
    assert not (tmp_path / "x.h5").exists()


def test_cli_and_api_store_the_same_config_which_gives_the_options_back(tmp_path):
    assert main(["record", SPEC, DATA, "--random-init", "--out", str(tmp_path / "cli.h5"), *FLAGS]) == 0
    loaded = qkhooks.load_model(SPEC, random_init=True)
    record_dataset(loaded, DATA, tmp_path / "options.h5", options=SAME, progress=False)
    record_dataset(loaded, DATA, tmp_path / "keywords.h5", modes=4, layers=[0, 2], attention="rows:2", input="residual",
                   augmented=True, dtype="float32", compression="gzip", batch_size=3, limit=2, progress=False)

    def config(name: str) -> str:
        with open_run(tmp_path / name) as run:
            return run.attrs["config"]

    stored = config("cli.h5")
    assert config("options.h5") == stored and config("keywords.h5") == stored
    as_dict = json.loads(stored)
    assert set(as_dict) == {"model", "data", "modes", "layers", "attention", "input", "augmented", "dtype", "limit",
                            "reducers", "random_init", "weights", "store_modes", "shard", "extra"}  # the schema
    assert as_dict["attention"] == [{"kind": "rows", "layers": [2]}] and as_dict["layers"] == [0, 2]

    back = RecordOptions.from_config(as_dict)  # the content-defining options, resolved; the rest at defaults
    assert back == RecordOptions(modes=4, layers=(0, 2), attention="rows:2", input="residual", augmented=True,
                                 dtype="float32", limit=2)
    record_dataset(loaded, DATA, tmp_path / "again.h5", options=back, progress=False)
    assert config("again.h5") == stored


def test_help_of_record_options_lists_every_option_with_its_default_and_what_it_does():
    import dataclasses
    import re

    from qkhooks.options import RecordOptions

    doc = RecordOptions.__doc__
    for field in dataclasses.fields(RecordOptions):
        line = re.search(rf"^    {field.name} \(default (.*?)\): (.+)$", doc, re.M)
        assert line is not None, field.name
        assert line.group(1).startswith(repr(field.default)) and len(line.group(2)) > 20, line.group(0)
    assert "Batches between checkpoints of the reducers' states" in doc  # an API-only option's docstring


def test_help_of_record_options_is_the_same_where_python_cannot_read_the_source():
    """A build without the .py source (a frozen or .pyc-only install, inspect.getsource refusing) lists every option
    with the same text: the help is built from the fields' declared docs, nothing is read back from the source."""
    import os
    import subprocess
    import sys

    code = ("import inspect\n"
            "def no_source(obj):\n    raise OSError('no source')\n"
            "inspect.getsource = no_source\n"
            "from qkhooks.options import RecordOptions\n"
            "print(RecordOptions.__doc__, end='')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == RecordOptions.__doc__
    assert "checkpoint_every (default 8, --checkpoint-every): Batches between checkpoints of the reducers' states" in done.stdout
