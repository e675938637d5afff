"""Mutation testing of the core, one module at a time, each against its own tests (``make mutation``).

Each module gets a scratch copy of the project under ``.mutation/<module>/`` with a ``[mutmut]`` section that
mutates that module only and selects that module's tests; mutmut then runs each mutant against the tests that
execute the mutated function. The copies are kept, and files are copied only when their content changed, so a
second run re-tests only the functions whose source changed (mutmut keys its cached verdicts by a hash of each
function), plus the earlier survivors, since new tests may kill them.

The score per module is ``killed / (mutants - equivalent)``, where a mutant no selected test executes counts
as not killed, and equivalent mutants are listed with a one-line reason in ``tests/mutation_equivalent.txt``.
"""

from __future__ import annotations

import argparse
import configparser
import filecmp
import fnmatch
import json
import os
import random
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
EQUIVALENT = ROOT / "tests" / "mutation_equivalent.txt"

# module -> (files to mutate, test files, -k expression or None). Keep the selection narrow: every mutant runs
# the selected tests that execute the mutated function, so a wide selection multiplies the run time. Changing a
# module's files or -k expression makes mutmut forget all of that module's verdicts (a full rerun); a new test in
# a file already selected, with a name the expression matches, only re-collects the stats.
# The `tiny` fixture's families that add no asymmetry over the five kept (timm / HF 4 x 6 grids with mean != std
# and key-before-query, registers on both sides, SigLIP without prefix tokens): a mutant that only these catch
# would be a bug in the family's adapter (module "models"), not in the core code run on the kept five. Leaving
# them out cuts each mutant's tests by more than half: forked from a server that has only collected, a worker pays
# every model's first forward again (20-25 s of test time for projector's 25 tests at load 8).
SAME_FORM_FAMILIES = "deit or clip or hf-dinov2] or timm-vit] or hf-vit]"
# Round 10 (mut-io): the I/O and statistics modules narrowed to their core files so that each finishes on the
# quiet machine in the time a round leaves (models: 5500 lines, thousands of mutants); tests/MUTATION.md names
# what is left out. Their kill tests live in one file, selected for each of them.
KILLS_IO = "tests/test_mutation_kills_io.py"
# Round 11 (mut11-rest): the kill tests of reducers, models, stream, store, preprocess and statistics.
KILLS_REST = "tests/test_mutation_kills_rest.py"
KILLS_CAPTURE = "tests/test_mutation_kills_capture.py"
# Round 13 (mut13-capture): the fast tests of the zoo11 forms that reach capture code nothing else in its selection
# runs: per-frame layers joined (VidEoMT: `_repeated_call`, `_join_calls`, `_joined_calls`), a layer run twice
# refused, maps observed inside the module (`_inside_hooks`, maps-only layers under outputs="eager"), two-softmax
# terms (`terms`, `statics`, the run file's terms). ~9 s of tests at load 2; GCViT, EfficientViT-MSRA, ConViT's
# product test and its run-file test (2-4 s each) add no capture branch these miss.
CAPTURE_FORMS = ("videomt_per_frame or run_twice_in_one_forward or maps_taken_from_a_fused_sdpa "
                 "or maps_only_layers_run_as_they_are or differential_maps_terms or differential_rows "
                 "or (one_product_of_q_and_k and differential) or terms_need_full_maps or gpsa_maps_terms "
                 "or test_terms_runs")
# Round 12 (mut12-models): the adapters' branches only families outside the plain ViTs reach (PiT, RoPE, q/k-norm,
# CaiT, reduced keys, grouped-query keys, HF DINOv3 / Data2Vec / BEiT / EoMT / BLIP / GroupViT), ~40 s.
KILLS_MODELS = "tests/test_mutation_kills_models.py"
# Round 12 (mut12-io): the kill tests of stream, store, preprocess and statistics.
KILLS_IO2 = "tests/test_mutation_kills_io2.py"
# Round 19 (mutation): the kill tests of the functions round 18 changed or added (module "round18").
KILLS_R19 = "tests/test_mutation_kills_r19.py"
# Round 20 (mutation): the kill tests of the functions round 19 changed or added (module "round19").
KILLS_R20 = "tests/test_mutation_kills_r20.py"
# Round 20 (second run): the kill tests of the functions round 20 changed or added (module "round20").
KILLS_R20B = "tests/test_mutation_kills_r20b.py"
# Round 21 (mutation): the kill tests of the functions round 21 changed or added (module "round21").
KILLS_R21 = "tests/test_mutation_kills_r21.py"
# Round 23 (mutation): the kill tests of the functions round 22 changed or added (module "round22").
KILLS_R23 = "tests/test_mutation_kills_r23.py"
# Round 24 (mutation): the kill tests of the functions round 23 changed or added (module "round24").
KILLS_R24 = "tests/test_mutation_kills_r24.py"
# Round 25 (mutation): the kill tests of the functions round 24 changed or added (module "round25").
KILLS_R25 = "tests/test_mutation_kills_r25.py"
# Round 26 (mutation): the kill tests of round 25's code (module "round26").
KILLS_R26 = "tests/test_mutation_kills_r26.py"
# Round 26 (second run): the kill tests of round 26's own code (module "round26b").
KILLS_R26B = "tests/test_mutation_kills_r26b.py"
# Round 27 (mutation): the kill tests of round 27's code (module "round27").
KILLS_R27 = "tests/test_mutation_kills_r27.py"
# Round 27 (second run): the kill tests of round 27's later library commits (module "round27b").
KILLS_R27B = "tests/test_mutation_kills_r27b.py"
# Round 28 (clean): the kill tests of round 27's review items mended in round 28 (module "round28").
KILLS_R28 = "tests/test_mutation_kills_r28.py"
# Round 28 (stale): kills of `RunWriter._check_whole`'s mutants (resumes of killed or damaged runs), module "round21".
KILLS_R28B = "tests/test_mutation_kills_r28b.py"
# Round 29 (mutation): the kill tests of round 29's library code (module "round29").
KILLS_R29 = "tests/test_mutation_kills_r29.py"
# Round 30 (read): kills of `RunArray._read`'s mutants round 28 left out (module "round30read").
KILLS_R30_READ = "tests/test_mutation_kills_r30_read.py"
# Round 30 (mutation): the kill tests of round 30's library code (module "round30").
KILLS_R30 = "tests/test_mutation_kills_r30.py"
# Round 31 (mutation): the kill tests of round 30's later library code (module "round31").
KILLS_R31 = "tests/test_mutation_kills_r31.py"
# Round 32 (mutation): the kill tests of the library code of rounds 31 and 32 (module "round32").
KILLS_R32 = "tests/test_mutation_kills_r32.py"
# Round 33 (mutation): the kill tests of round 32's later library code, the review fixes (module "round33").
KILLS_R33 = "tests/test_mutation_kills_r33.py"
# Round 34 (mutation): the kill tests of round 33's later library code and round 34's fixes (module "round34").
KILLS_R34 = "tests/test_mutation_kills_r34.py"
# Round 37 (mutation): the kill tests of the library code of rounds 35-37 (module "round37").
KILLS_R37 = "tests/test_mutation_kills_r37.py"
# Round 39 (mutation): the kill tests of round 37's lines left unrun by round 38 (module "round37rest") and of round
# 38's library code (module "round38").
KILLS_R38 = "tests/test_mutation_kills_r38.py"
# Round 40 (mutation): the kill tests of round 39's library code (module "round39").
KILLS_R39 = "tests/test_mutation_kills_r39.py"
# Round 41 (mutation): the kill tests of round 41's library code (module "round41").
KILLS_R41 = "tests/test_mutation_kills_r41.py"
# Round 42 (mutation): the kill tests of round 40's library code (module "round40").
KILLS_R42 = "tests/test_mutation_kills_r42.py"
# Round 42 (lead): the kill tests of round 42's own library code (module "round42").
KILLS_R42B = "tests/test_mutation_kills_r42b.py"
# Round 45 (mutation): the kill tests of round 44's run-file repair code (module "round44").
KILLS_R45 = "tests/test_mutation_kills_r45.py"
# Round 46 (mutation): the kill tests of round 45's library code (module "round45").
KILLS_R46 = "tests/test_mutation_kills_r46.py"
# Round 47 (mutation): the kill tests of round 46's library code (module "round46").
KILLS_R47 = "tests/test_mutation_kills_r47.py"
# Round 48 (mutation): the kill tests of round 47's library code (module "round47").
KILLS_R48 = "tests/test_mutation_kills_r48.py"
# Round 49 (mutation): the kill tests of round 48's library code (module "round48").
KILLS_R49 = "tests/test_mutation_kills_r49.py"
# Round 50 (mutation): the kill tests of round 49's library code (module "round49").
KILLS_R50 = "tests/test_mutation_kills_r50.py"
# Round 51 (mutation): the kill tests of round 50's library code (module "round50").
KILLS_R51 = "tests/test_mutation_kills_r51.py"
# Round 13 (mut13-attention): the kill tests of attention.py and sdpa.py, and the forms' tests that reach their
# two-softmax code (differential attention, ConViT GPSA: map_terms, full_and_terms) and the inside recorders
# (InsideCall's SDPA and 3-d softmax paths), one EfficientViT-MSRA size only.
KILLS_ATTENTION = "tests/test_mutation_kills_attention.py"
TWO_SOFTMAX_AND_INSIDE = ("(test_map_forms and (differential or gpsa_maps_terms or gpsa_rows or two_softmax)) or "
                          "(test_inside_forms and (fused_sdpa or (efficientvit and one-window)))")
# test_store_safety.py's in-process tests (the order of writes, flushes and commits; rows past `committed`;
# damaged files and repair); its other tests start processes or mount file systems.
IN_PROCESS_SAFETY = ("not test_store_safety or writes_data_then_flushes or readers_see_only_committed "
                     "or damaged_run_files")
MODULES: dict[str, tuple[list[str], list[str], str | None]] = {
    # spectrum leaves out test_spectrum.py's live dict-view test: it checks the warning's line, which mutmut's
    # trampoline frames move into mutmut (the stats pass failed on it); test_mutation_kills_core.py checks the rest.
    "spectrum": (["qkhooks/spectrum.py"],
                 ["tests/test_spectrum.py", "tests/test_core.py", "tests/test_mutation_kills.py", "tests/test_speed.py",
                  "tests/test_mutation_kills_core.py"],
                 "(spectrum or cosine or augmented or remixing or sum_to_model or bypass or cached or reuses) "
                 f"and not (live_layer_read_as_the_old_dict or {SAME_FORM_FAMILIES})"),
    "projector": (["qkhooks/projector.py"], ["tests/test_core.py", "tests/test_mutation_kills.py",
                                             "tests/test_mutation_kills_core.py", "tests/test_speed_round9.py"],
                  "(sum_to_model or qk_outputs or fall_back or augmented or residual or remixing or follows_the_dtype "
                  f"or projector or projections) and not ({SAME_FORM_FAMILIES})"),
    # attention (round 13): sdpa.py added (the products, sdpa_maps and AttentionCallMode moved there), with the
    # two-softmax and inside forms' fast tests (TWO_SOFTMAX_AND_INSIDE) and KILLS_ATTENTION.
    "attention": (["qkhooks/attention.py", "qkhooks/sdpa.py"],
                  ["tests/test_core.py", "tests/test_asymmetry.py", "tests/test_mutation_kills.py", "tests/test_full_once.py",
                   "tests/test_mutation_kills_core.py", "tests/test_map_forms.py", "tests/test_inside_forms.py",
                   KILLS_ATTENTION],
                  "((attention or rows or default_query or centre_patch or sdpa_maps or fused_kernel or dropout or "
                  "cannot_match or eager_outputs or own_eager_path) and not (test_map_forms or test_inside_forms) "
                  f"or {TWO_SOFTMAX_AND_INSIDE}) and not (rope_bias_windows or {SAME_FORM_FAMILIES})"),
    # capture (round 11): results.py and access.py added, with the tests that read results through them:
    # test_multigrid_runs.py's per-layer geometry (windows, reduced keys, a file without per-layer geometry);
    # test_mutation_kills_capture.py kills the rest against references. Round 13: the zoo11 forms' fast tests
    # (CAPTURE_FORMS) for the code only they reach.
    "capture": (["qkhooks/capture.py", "qkhooks/results.py", "qkhooks/access.py"],
                ["tests/test_core.py", "tests/test_asymmetry.py", "tests/test_vocabulary.py", "tests/test_multigrid_runs.py",
                 "tests/test_inside_forms.py", "tests/test_map_forms.py", "tests/test_terms_runs.py", KILLS_IO,
                 KILLS_CAPTURE],
                "(not (test_multigrid_runs or test_inside_forms or test_map_forms) or swin_run_stores or reduced_key "
                f"or without_per_layer_geometry or hand_made_batch or {CAPTURE_FORMS}) and not ({SAME_FORM_FAMILIES})"),
    "reducers": (["qkhooks/reducers.py"],
                 ["tests/test_reducers.py", "tests/test_modes.py", "tests/test_distributed.py", KILLS_REST],
                 "merge or state or reducer or shards or kills_rest"),
    "preprocess": (["qkhooks/data/preprocess.py"],
                   ["tests/test_data.py", "tests/test_asymmetry.py", KILLS_IO, KILLS_REST, KILLS_IO2], None),
    "models": (["qkhooks/models/base.py", "qkhooks/models/timm.py", "qkhooks/models/hf.py"],
               ["tests/test_core.py", "tests/test_asymmetry.py", "tests/test_offline.py", KILLS_IO, KILLS_REST, KILLS_MODELS],
               None),
    "store": (["qkhooks/store/writer.py", "qkhooks/store/reader.py", "qkhooks/store/format.py"],
              ["tests/test_store.py", "tests/test_store_safety.py", "tests/test_distributed.py",
               "tests/test_vocabulary.py", KILLS_IO, KILLS_REST, KILLS_IO2], IN_PROCESS_SAFETY),
    "stream": (["qkhooks/stream.py"],
               ["tests/test_store.py", "tests/test_store_safety.py", "tests/test_late_decode.py",
                "tests/test_distributed.py", "tests/test_options.py", KILLS_IO, KILLS_REST, KILLS_IO2],
               IN_PROCESS_SAFETY),
    "statistics": (
        ["qkhooks/analysis/topk.py", "qkhooks/analysis/anisotropy.py"],
        ["tests/test_modes.py", "tests/test_preference.py", "tests/test_bfd.py", "tests/test_reducers.py", KILLS_IO,
         KILLS_REST, KILLS_IO2],
        None,
    ),
    # Round 19 (mutation): the functions round 18 changed or added, across eight files, against the tests that reach
    # them (~40 s): the q/k path's check and solve, the all-mode weighted cosine and null modes, the anisotropy
    # interval, the weights' fingerprint, the resume identity check, the overwrite laid out beside the old run, the
    # run-file lock, the data files' absolute specs and sizes, and models/base.py's call-argument names, grid hooks
    # and recast. Run with --only ROUND18 (the functions by name); the files' other mutants have their modules.
    "round18": (["qkhooks/projector.py", "qkhooks/spectrum.py", "qkhooks/analysis/anisotropy.py", "qkhooks/stream.py",
                 "qkhooks/store/writer.py", "qkhooks/store/lock.py", "qkhooks/data_files.py", "qkhooks/models/base.py"],
                ["tests/test_qkpath_precision.py", "tests/test_mutation_kills.py", "tests/test_spectrum.py",
                 "tests/test_reducers.py", "tests/test_store_safety.py", "tests/test_store.py",
                 "tests/test_call_grids.py", "tests/test_modes.py", KILLS_R19],
                "test_qkpath_precision or test_mutation_kills_r19 or (test_mutation_kills and qk_path) or "
                "(test_spectrum and (truncated or without_weights or top_of_a_spectrum or null)) or "
                "(test_reducers and (interval or centre)) or (test_modes and anisotropy) or "
                "(test_store_safety and (resume or overwrite or another_name or hard_link or checkpoint_of_another "
                "or duplicate_ids or lock) and not (sigkill or full_disk or worker_processes)) or "
                "(test_store and (absolutely or moved_run or folder or corrupt_images_are_skipped)) or "
                "(test_call_grids and (hf_vits_read or mask_handed or vitmae or dynamic_size_vit or wrapped_model))"),
    # Round 20 (mutation): the functions round 19 changed or added, against the tests that reach them: the reducers'
    # non-finite refusal, BFD's id split and content refusal, the odd-one-out overlap refusal, the default modes cut,
    # layers by module path, the meta-device refusal, the run file's string/ids/identity readers, the reader's
    # numpy indexing and open retries, and the writer's damaged-resume refusal. Run with --only ROUND19.
    "round19": (["qkhooks/reducers.py", "qkhooks/analysis/bfd_reducers.py", "qkhooks/analysis/bfd_summary.py",
                 "qkhooks/data/masks.py", "qkhooks/analysis/preference.py", "qkhooks/capture.py",
                 "qkhooks/models/base.py", "qkhooks/models/load.py", "qkhooks/store/format.py",
                 "qkhooks/store/reader.py", "qkhooks/store/_hdf5.py", "qkhooks/store/writer.py"],
                ["tests/test_reducers.py", "tests/test_modes.py", "tests/test_bfd.py", "tests/test_preference.py",
                 "tests/test_inputs.py", "tests/test_core.py", "tests/test_mutation_kills_capture.py",
                 "tests/test_store_damaged_resume_and_retries.py", "tests/test_store.py", "tests/test_store_safety.py", KILLS_R20],
                "test_store_damaged_resume_and_retries or test_mutation_kills_r20 or (test_reducers and nan_or_inf_image) or "
                "(test_modes and nan_map) or (test_bfd and (probe_split or split_by_position or identical_images or "
                "nan_or_inf_pixels)) or (test_preference and (overlap or touch)) or "
                "(test_inputs and (modes or meta_device)) or (test_core and (module_path or layer_selections)) or "
                "(test_mutation_kills_capture and layers_are_resolved) or "
                "(test_store and (run_array_indexes or closed_reader)) or "
                "(test_store_safety and (damaged or weights_hash) and not (sigkill or full_disk or worker_processes or within_20_s "
                "or damaged_run_files_open))"),
    # Round 20 (second run): the functions round 20 changed or added, against the tests that reach them: the layer's
    # cached projectors (_LayerModes), layers by module path, the per-image file sizes, the writer sink, the photos'
    # EXIF/PNG orientation and load-time refusals, the spec grammar, the reader's HDF5-error test and checksum line,
    # repair's readable rows, the resume's file layout and whole-file check, the SWMR writer's open. --only ROUND20.
    "round20": (["qkhooks/capture.py", "qkhooks/access.py", "qkhooks/models/base.py", "qkhooks/data_files.py",
                 "qkhooks/stream.py", "qkhooks/data/items.py", "qkhooks/data/datasets.py", "qkhooks/store/reader.py",
                 "qkhooks/store/repair.py", "qkhooks/store/writer.py", "qkhooks/store/format.py",
                 "qkhooks/store/_hdf5.py"],
                ["tests/test_data_spec_grammar.py", "tests/test_data_absolute_specs.py", "tests/test_data.py", "tests/test_store_file_sizes.py",
                 "tests/test_checksum.py", "tests/test_store_damaged_resume_and_retries.py", "tests/test_store_safety.py", "tests/test_core.py",
                 "tests/test_mutation_kills_capture.py", "tests/test_mutation_kills_r19.py",
                 "tests/test_qkpath_precision.py", "tests/test_speed_e2e.py", KILLS_R20B],
                "test_data_spec_grammar or test_store_file_sizes or test_checksum or test_store_damaged_resume_and_retries or test_mutation_kills_r20b or "
                "(test_data_absolute_specs and not masks_missing_late) or "
                "(test_data and (exif or frame_cannot_be_told or mask_turns)) or "
                "(test_core and (module_path or layer_selections)) or "
                "(test_mutation_kills_capture and (layers_are_resolved or reuses_the_projectors or given_spectrum_over)) or "
                "(test_mutation_kills_r19 and (absolute_spec or changed_files or file_sizes)) or "
                "(test_qkpath_precision and several_k) or (test_speed_e2e and record_entered_again) or "
                "(test_store_safety and damaged and not (sigkill or full_disk or worker_processes or within_20_s "
                "or damaged_run_files_open))"),
    # Round 21 (mutation): the functions round 21 changed or added, against the tests that reach them: a photo's
    # own faults and its one oriented decode (also for streamed masks), repair's chunk walk and verify_run, the file
    # layout's checks, the reader's contiguous-span reads, one image a chunk for filtered arrays, the SWMR writer's
    # errno fallback, the closest module paths, the q/k path only for float32 q/k and the weights' check inside
    # record(), the unplain-W_q/W_k refusal and half-precision scaled logits. --only ROUND21.
    "round21": (["qkhooks/data/items.py", "qkhooks/data/readers.py", "qkhooks/store/repair.py",
                 "qkhooks/store/format.py", "qkhooks/store/reader.py", "qkhooks/store/writer.py",
                 "qkhooks/store/_hdf5.py", "qkhooks/access.py", "qkhooks/capture.py", "qkhooks/spectrum.py",
                 "qkhooks/models/unsupported.py", "qkhooks/sdpa.py"],
                ["tests/test_data_unreadable_files.py", "tests/test_verify_run.py", "tests/test_repair_shards_and_short_arrays.py",
                 "tests/test_chunk_rewrite.py", "tests/test_store_slices_layouts_and_lock.py", "tests/test_wrapped_qk_layers_and_half_precision.py",
                 "tests/test_low_precision_x_path.py", "tests/test_data_spec_grammar.py", "tests/test_store_file_sizes.py",
                 "tests/test_store_damaged_resume_and_retries.py", "tests/test_checksum.py", "tests/test_store.py", "tests/test_core.py",
                 "tests/test_store_safety.py", KILLS_R20B, KILLS_R21, KILLS_R28B],
                "test_data_unreadable_files or test_verify_run or test_repair_shards_and_short_arrays or test_chunk_rewrite or test_store_slices_layouts_and_lock or "
                "test_mutation_kills_r28b or "
                "test_wrapped_qk_layers_and_half_precision or test_low_precision_x_path or test_mutation_kills_r21 or test_data_spec_grammar or "
                "test_store_file_sizes or test_checksum or test_mutation_kills_r20b or "
                "(test_store_damaged_resume_and_retries and (damaged_killed_run or every_object)) or "
                "(test_store and (run_array_indexes or lazy_indexing)) or "
                "(test_core and module_path) or "
                "(test_store_safety and damaged and not (sigkill or full_disk or worker_processes or within_20_s "
                "or damaged_run_files_open))"),
    # Round 23 (mutation): the functions round 22 changed or added, against the tests that reach them: the q/k
    # modules' entry check (others' hooks, forwards replaced on the instance, tensor-subclass weights, accelerate's
    # wrapper, qkhooks' own hooks), the bit-for-bit weights compare and the spectrum cache keyed by it, the reader's
    # slices cut by arithmetic, its shared HDF5 handle and axis check, and the readings' bootstrap-t intervals.
    # --only ROUND22.
    "round22": (["qkhooks/models/unsupported.py", "qkhooks/spectrum.py", "qkhooks/store/reader.py",
                 "qkhooks/readings.py"],
                ["tests/test_foreign_hooks_refused.py", "tests/test_inference_mode_weights_check.py", "tests/test_store_shared_handle.py",
                 "tests/test_readings_null_calibration.py", "tests/test_readings.py", "tests/test_newcomer_messages.py",
                 "tests/test_wrapped_qk_layers_and_half_precision.py", "tests/test_store_slices_layouts_and_lock.py", "tests/test_store.py", KILLS_R21, KILLS_R23],
                "test_foreign_hooks_refused or test_inference_mode_weights_check or test_store_shared_handle or test_readings or "
                "test_mutation_kills_r23 or (test_mutation_kills_r21 and (lora or pinned or levit)) or "
                "(test_newcomer_messages and (state or integer_past or spectrum_takes)) or "
                "(test_wrapped_qk_layers_and_half_precision and (lora or linear_subclass or recomputed or peft)) or "
                "(test_store_slices_layouts_and_lock and (every_image_selection or picked_images or spanning)) or "
                "(test_store and (run_array_indexes or lazy_indexing or closed_reader))"),
    # Round 24 (mutation; named for the round that ran it): the functions round 23 changed or added, against the
    # tests that reach them: the writer's fixed costs (the arrays it made, the committed count opened once, the
    # layout's groups kept), the file size limit (EFBIG) and quota (EDQUOT) handled as a full disk, the SWMR reopen
    # before the rename, the lock file's reserve; top-k's one stable sort; the readings' clipped intervals, pair
    # pivots and crossing sentence, the anisotropy baseline's pivots; the compiled / opaque / late-hook refusals and
    # the per-batch check. Left out: the children of test_store_write_failures.py's file size limit tests (they run
    # unmutated code; test_mutation_kills_r24.py has both in this process) and test_store_safety.py's tmpfs
    # full-disk test (27 s a mutant; test_mutation_kills_io2.py's full disk covers its writer paths). --only ROUND23.
    "round24": (["qkhooks/store/writer.py", "qkhooks/store/lock.py", "qkhooks/store/format.py",
                 "qkhooks/analysis/topk.py", "qkhooks/readings.py", "qkhooks/analysis/anisotropy.py",
                 "qkhooks/models/unsupported.py", "qkhooks/capture.py"],
                ["tests/test_writer_layout_and_count.py", "tests/test_store_write_failures.py", "tests/test_topk_ranking_sorts.py",
                 "tests/test_readings_clipped_intervals.py", "tests/test_readings_null_calibration.py", "tests/test_readings.py",
                 "tests/test_torch_tooling_refused.py", "tests/test_foreign_hooks_refused.py", "tests/test_reducers.py",
                 "tests/test_store_safety.py", "tests/test_mutation_kills_io.py", KILLS_IO2, "tests/test_mutation_kills_r19.py",
                 KILLS_R23, KILLS_R24],
                "test_writer_layout_and_count or (test_store_write_failures and not file_size_limit) or test_topk_ranking_sorts or "
                "test_readings or test_torch_tooling_refused or test_foreign_hooks_refused or test_mutation_kills_r23 or "
                "test_mutation_kills_r24 or (test_reducers and (interval or centre)) or "
                "(test_mutation_kills_r19 and pair_pivots) or (test_mutation_kills_io and full_disk_is_told) or "
                "(test_mutation_kills_io2 and (full_disk or free_space_check or find_their_arrays or string_static or "
                "array_changes_shape or compressed_run_whose_first_batch)) or "
                "(test_store_safety and (full_disk_while_laying_out or write_error_inside_hdf5 or overwrite_keeps or "
                "writes_data_then) and not sigkill)"),
    # Round 25 (mutation): the functions round 24 changed or added, against the tests that reach them (~40 s): the
    # compile and quantisation refusals narrowed to the attention (`_at`, `hooked_paths`), qkhooks' hooks marked and
    # refusing to be traced (`own_hook`, `_untraced`, `_refuse_traced`, `traced_refusal`, `Recording.__exit__`); the
    # ids' digests (written, read, cut, verified, repaired, merged), repair's one walk of the chunk index; the lock's
    # same-process refusal; the weights fingerprint's state entries. Left out: test_store_safety.py's live-run second
    # writer (its writer runs in a child process, 24 s) and test_verify_run.py's unopenable file (6 s, no round-24
    # code). --only ROUND24.
    "round25": (["qkhooks/models/unsupported.py", "qkhooks/capture.py", "qkhooks/store/format.py",
                 "qkhooks/store/writer.py", "qkhooks/store/repair.py", "qkhooks/store/lock.py",
                 "qkhooks/store/reader.py", "qkhooks/distributed.py", "qkhooks/stream.py"],
                ["tests/test_torch_compile.py", "tests/test_ids_checksum.py", "tests/test_chunk_walk.py",
                 "tests/test_quantised_head_fingerprint.py", "tests/test_foreign_hooks_refused.py", "tests/test_verify_run.py",
                 "tests/test_repair_shards_and_short_arrays.py", "tests/test_store_safety.py", "tests/test_mutation_kills_r19.py",
                 KILLS_R24, KILLS_R25],
                "test_torch_compile or test_ids_checksum or test_chunk_walk or test_quantised_head_fingerprint or "
                "test_foreign_hooks_refused or test_repair_shards_and_short_arrays or test_mutation_kills_r25 or "
                "(test_verify_run and not does_not_open) or (test_mutation_kills_r24 and second_writer) or "
                "(test_store_safety and another_name) or (test_mutation_kills_r19 and fingerprint)"),
    # Round 26 (mutation): round 25's code, against the tests that reach it: host-to-device copies (`to_device`), the
    # entry's and the per-batch batched weights verdicts (`cached_weights_checked`, `_cache_verdicts`,
    # `weights_unchanged`, `_cached_still_valid`, with the device path opened on the CPU), the run files' format number
    # (`create_run_file`, `refuse_newer_format` and its callers in the resume, merge, repair and verify), repair's one
    # chunk reader (`_failing_rows(rows_per_read, each)`, `_ids_off_their_digests`), the anisotropy reducer's one read of
    # the counts, PositionDecoding's host-made row indices and the windows' host-side checks. Left out:
    # test_cuda_paths.py (CUDA, or QKHOOKS_TEST_DEVICE=cpu: whole recordings that duplicate the tests below on the CPU).
    # --only ROUND25.
    "round26": (["qkhooks/_devices.py", "qkhooks/spectrum.py", "qkhooks/capture.py", "qkhooks/store/_hdf5.py",
                 "qkhooks/store/format.py", "qkhooks/store/repair.py", "qkhooks/store/writer.py",
                 "qkhooks/distributed.py", "qkhooks/analysis/anisotropy.py", "qkhooks/analysis/bfd_reducers.py",
                 "qkhooks/models/windows.py"],
                ["tests/test_device_transfers.py", "tests/test_format_version_refusals.py", "tests/test_digest_walk.py",
                 "tests/test_inference_mode_weights_check.py", "tests/test_ids_checksum.py", "tests/test_chunk_walk.py",
                 "tests/test_repair_shards_and_short_arrays.py", "tests/test_verify_run.py", "tests/test_windows_forms.py",
                 "tests/test_bfd.py", "tests/test_reducers.py", "tests/test_modes.py", KILLS_R25, KILLS_R26],
                "test_device_transfers or test_format_version_refusals or test_digest_walk or test_inference_mode_weights_check or "
                "test_ids_checksum or test_chunk_walk or test_repair_shards_and_short_arrays or test_mutation_kills_r26 or "
                "(test_verify_run and not does_not_open) or (test_windows_forms and windowed_rows_and_pooled) or "
                "(test_bfd and (decoding_separates or position_probe or probe_split)) or "
                "(test_reducers and anisotropy) or (test_modes and anisotropy_equals) or "
                "(test_mutation_kills_r25 and (digest or repair or verify))"),
    # Round 26 (second run): round 26's own code, against the tests that reach it: the q/k path's per-image products
    # subtracting the offsets (`QKPathProjector._maps`, layout "images"), record()'s entry (`structure_key` skipping
    # torch's registries by name, `model_sites`, `_CopyPlan`, `_copy_plan`), top-k's cached signs (`_signs_on` and its
    # callers `_fold_layers`, `_merge_entrants`), the format line of `qkhooks info` (`describe_format`,
    # `_is_format_number`, `RunReader.summary`). repair.py is left out: its `halved` ran in round 26's first run (module
    # "round26"). Left out: test_speed_round10.py's page-fault benchmark (no round-26 code) and test_zoo.py's second
    # recording (every family: minutes a mutant). --only ROUND26.
    "round26b": (["qkhooks/projector.py", "qkhooks/capture.py", "qkhooks/analysis/topk.py", "qkhooks/store/format.py",
                  "qkhooks/store/reader.py"],
                 ["tests/test_speed_round9.py", "tests/test_speed_round10.py", "tests/test_speed_round11.py",
                  "tests/test_mutation_kills_capture.py", "tests/test_foreign_hooks_refused.py", "tests/test_topk_signs.py",
                  "tests/test_topk_ranking_sorts.py", "tests/test_format_version_info.py", KILLS_R26B],
                 "test_topk_signs or test_topk_ranking_sorts or test_format_version_info or test_mutation_kills_r26b or "
                 "(test_speed_round9 and not workers_default) or (test_speed_round10 and not page_faults) or "
                 "(test_speed_round11 and geometry_probe) or "
                 "(test_mutation_kills_capture and (cached_sites or replaced_by_another)) or "
                 "(test_foreign_hooks_refused and nested_recordings)"),
    # Round 27 (mutation): round 27's code, against the tests that reach it: an accelerator's top-k fold from the layers'
    # maps stacked (`_stacked_maps`, `_layer_extremes(..., stacked)`, `_fold_layers`' one row index, `_store_stacked`'s
    # unbind views, `TopKModes.update`'s stacks; opened on the CPU by the tests' `fold_path` / `accelerator_fold`
    # fixtures), the anisotropy reducer's stacked layers (`AnisotropyReducer.update`, `_finite_centres`) and the q/k
    # path's unsliced weights (`QKPathProjector._maps`). Left out: test_modes.py's run-file, CLI and figure tests (a
    # recorded run each, no round-27 line they alone reach), test_distributed.py's shard writers but the top-k merge
    # (2 s each), test_reducers.py's import checks (fresh interpreters). --only ROUND27.
    "round27": (["qkhooks/analysis/topk.py", "qkhooks/analysis/anisotropy.py", "qkhooks/projector.py"],
                ["tests/test_reducer_ops.py", "tests/test_topk_ranking_sorts.py", "tests/test_topk_signs.py",
                 "tests/test_modes.py", "tests/test_reducers.py", "tests/test_distributed.py",
                 "tests/test_speed_round9.py", KILLS_R26B, KILLS_R27],
                "test_reducer_ops or test_topk_ranking_sorts or test_topk_signs or test_mutation_kills_r27 or "
                "(test_modes and (topk or anisotropy or fold or merge_of_two_halves or state_dict_round_trip or "
                "prefix_inference) and not weighted_cosine) or "
                "(test_reducers and not (imports or import_the_command_line)) or "
                "(test_distributed and merge_renumbers) or "
                "(test_speed_round9 and (fused or projector)) or "
                "(test_mutation_kills_r26b and (without_biases or folding_batches))"),
    # Round 27 (second run): round 27's later library commits, against the tests that reach them: verify's format line
    # (`VerifyReport.format` / `summary`, repair's `_format_attrs`, `_refuse_newer_format`, `_format_line`, `_verify`),
    # the q/k hook's fewer operations (`Recording._qk_hook`: q and k sliced apart only for rows or full maps, the
    # fused block handed whole to `QKPathProjector.from_fused`, `detach` only where grad is tracked; the layer hook's
    # kept inputs), the writer's `_to_host`, and the entry's cached compile verdict (`model_sites`' third item,
    # `_maybe_compiled`, `Recording.__init__`, `compiled_by_dynamo`). Left out: test_verify_run.py's unopenable file
    # (6 s, no round-27 line), test_core.py's x fallback (default-width ViTs, 9 s; test_low_precision_x_path.py's autocast
    # tests send fused and separate q/k layers to x instead), test_mutation_kills.py's q/k path projector tests (default
    # width, 6 s each, no round-27 line), test_torch_compile.py's dataset run and quantised tests. --only ROUND27B.
    "round27b": (["qkhooks/store/repair.py", "qkhooks/capture.py", "qkhooks/projector.py", "qkhooks/store/writer.py",
                  "qkhooks/models/unsupported.py"],
                 ["tests/test_verify_names_format.py", "tests/test_format_version_refusals.py", "tests/test_verify_run.py",
                  "tests/test_mutation_kills_r25.py", "tests/test_hook_ops.py", "tests/test_core.py",
                  "tests/test_speed_round9.py", "tests/test_low_precision_x_path.py", "tests/test_mutation_kills_capture.py",
                  "tests/test_entry_compiled_search.py", "tests/test_torch_compile.py", "tests/test_mutation_kills_r24.py", KILLS_R27B],
                 "test_verify_names_format or test_format_version_refusals or test_hook_ops or test_entry_compiled_search or "
                 "test_mutation_kills_r27b or (test_verify_run and not does_not_open) or "
                 "(test_mutation_kills_r25 and (verify or compiled)) or "
                 f"(test_core and (qk_outputs or fused_attention_kept) and not (fall_back or {SAME_FORM_FAMILIES})) or "
                 "(test_speed_round9 and (fused or projector)) or "
                 "(test_low_precision_x_path and (autocast_entered_inside or separate_linears_under_autocast)) or "
                 "(test_mutation_kills_capture and (rows_taken_from_the_qk_hook or compute_dtype_cast or bypasses "
                 "or two_softmax_terms)) or "
                 "(test_torch_compile and (compiling_inside or wrapper_compiled or compiled_head or "
                 "compiled_or_quantised)) or (test_mutation_kills_r24 and compiled)"),
    # Round 28 (clean): round 27's review items, mended, against the tests that reach them: one helper detaching only
    # what tracks grad (`_devices.detached`, in the layer hook's kept inputs, the q/k hook and the writer's `_to_host`),
    # the q/k hook's outputs held as one tuple (`Recording._qk_hook`), the anisotropy reducer folding the finite check's
    # stack as it is (`AnisotropyReducer.update`, `_finite_centres`, `CentreEmbeddings.update`). Left out: what
    # round27b leaves out, and its verify, format and compile tests (no round-28 line). --only ROUND28.
    "round28": (["qkhooks/_devices.py", "qkhooks/capture.py", "qkhooks/store/writer.py", "qkhooks/analysis/anisotropy.py"],
                ["tests/test_hook_ops.py", "tests/test_reducer_ops.py", "tests/test_low_precision_x_path.py",
                 "tests/test_core.py", "tests/test_speed_round9.py", "tests/test_mutation_kills_capture.py",
                 "tests/test_mutation_kills_r27.py", KILLS_R27B, "tests/test_reducers.py", "tests/test_modes.py",
                 KILLS_R28],
                "test_hook_ops or test_reducer_ops or test_mutation_kills_r28 or "
                "(test_low_precision_x_path and (autocast_entered_inside or separate_linears_under_autocast or "
                "pinned_qk_source or float32_keeps)) or "
                f"(test_core and (qk_outputs or fused_attention_kept) and not (fall_back or {SAME_FORM_FAMILIES})) or "
                "(test_speed_round9 and (fused or projector)) or "
                "(test_mutation_kills_capture and (rows_taken_from_the_qk_hook or compute_dtype_cast or bypasses "
                "or two_softmax_terms)) or "
                "(test_mutation_kills_r27b and (fused_qkv or handing_a_batch)) or "
                "(test_mutation_kills_r27 and (anisotropy or held_apart)) or "
                "(test_reducers and (anisotropy or centre)) or (test_modes and anisotropy_equals)"),
    # Round 28 (lead): the writer's packed hand-off (`_to_host_all`, `_packed`, `_unpacked`, `_element_size`: a batch's
    # GPU arrays leave each device in one copy), against its tests and the store's batch tests. The GPU-only lines
    # (the pinned block, the copy, the event) run only where torch sees a GPU. --only ROUND28B.
    "round28b": (["qkhooks/store/writer.py"], ["tests/test_writer_handoff.py", "tests/test_store.py"],
                 "test_writer_handoff or (test_store and (float16_storage or commits_whole_batches))"),
    # Round 29 (mutation): round 29's library code (`e52c7d9..0c36b52`): the anisotropy baseline's centre rows taken in
    # the layer's hook (`take_inputs`, `_batch_centres`), the recording's `takes_inputs` / `keep_last`, record_dataset's
    # `keep_inputs` decision and `resumed_from`, the writer's `_statics_only`, and `record --resume`'s message, against
    # their tests and the anisotropy tests. --only ROUND29.
    "round29": (["qkhooks/analysis/anisotropy.py", "qkhooks/capture.py", "qkhooks/stream.py", "qkhooks/store/writer.py",
                 "qkhooks/cli/record.py"],
                ["tests/test_taken_inputs_anisotropy.py", "tests/test_newcomer_refusals.py", "tests/test_reducer_ops.py",
                 "tests/test_reducers.py", "tests/test_modes.py", "tests/test_mutation_kills_r27.py", KILLS_R29],
                "test_taken_inputs_anisotropy or test_mutation_kills_r29 or "
                "(test_newcomer_refusals and (resume_says or ended_with_no_image or statics_only_resume)) or "
                "(test_reducer_ops and anisotropy) or (test_reducers and (anisotropy or centre)) or "
                "(test_modes and anisotropy_equals) or (test_mutation_kills_r27 and anisotropy)"),
    # Round 30 (read): `RunArray._read`'s mutants round 28 left out, against the tests that index a RunArray (numpy's
    # answer on the rows read whole, the contiguous reads, the refusals' words; ~15 s). store/reader.py only; run with
    # --only on `_read`'s names.
    "round30read": (["qkhooks/store/reader.py"],
                    ["tests/test_store.py", "tests/test_store_slices_layouts_and_lock.py", "tests/test_store_shared_handle.py",
                     "tests/test_mutation_kills_io.py", "tests/test_mutation_kills_r20.py",
                     "tests/test_mutation_kills_r21.py", "tests/test_mutation_kills_r23.py", KILLS_R30_READ],
                    "test_mutation_kills_r30_read or "
                    "(test_store and (run_array_indexes or lazy_indexing or every_image_selection or picked_images "
                    "or spanning or step_one_slice or stepped_slice)) or "
                    "(test_mutation_kills_io and run_array_indexing) or "
                    "(test_mutation_kills_r20 and (run_array_read or run_array_reads)) or "
                    "(test_mutation_kills_r21 and boolean_image_mask) or "
                    "(test_mutation_kills_r23 and integer_past)"),
    # Round 30 (mutation): round 30's library code (`369d0ec..abe37ed`): a joining layer's tokens handed to the sinks
    # that take inputs once joined (capture.py), record_dataset's keep_inputs, TakenParts (reducers.py), the BFD
    # reducers' take_inputs and whole-batch folds, bfd.py's ids; options.py's change is a docstring only. Against the
    # taken-inputs tests of rounds 29 and 30, test_bfd.py and test_reducers.py whole (in-process, ~10 s), the position
    # probes' tests of round 20 and the kill files of rounds 29 and 30. Run with --only ROUND30.
    "round30": (["qkhooks/capture.py", "qkhooks/stream.py", "qkhooks/reducers.py", "qkhooks/options.py",
                 "qkhooks/analysis/anisotropy.py", "qkhooks/analysis/bfd.py", "qkhooks/analysis/bfd_reducers.py"],
                ["tests/test_taken_inputs_bfd.py", "tests/test_taken_inputs_anisotropy.py", "tests/test_bfd.py",
                 "tests/test_reducers.py", "tests/test_mutation_kills_r20.py", KILLS_R29, KILLS_R30],
                "test_taken_inputs_bfd or test_taken_inputs_anisotropy or test_bfd or test_reducers or "
                "test_mutation_kills_r29 or test_mutation_kills_r30 or (test_mutation_kills_r20 and position_probes)"),
    # Round 31 (mutation): round 30's later library code (`abe37ed..4a07a01`): run.last freed as the next forward begins
    # and the refusal after a forward that raised, each layer's own geometry for a live recording's sinks (capture.py,
    # results.py), a pretrained hf: checkpoint without a readable processor refused and the processor saved beside a
    # module read (models/load.py), `qkhooks bfd`'s data flags (options.py's add_arguments(names=), bfd.py,
    # cli/bfd.py); stream.py's change is a comment only. Against the taken-inputs tests of round 30, the preprocessing
    # tests of round 30, test_bfd.py and test_options.py (in-process tests), round 29's keep_last tests, the hand-made
    # batch's refusals and the kill files of rounds 30 and 31. Run with --only ROUND31.
    "round31": (["qkhooks/capture.py", "qkhooks/results.py", "qkhooks/stream.py", "qkhooks/options.py",
                 "qkhooks/models/load.py", "qkhooks/analysis/bfd.py", "qkhooks/cli/bfd.py"],
                ["tests/test_taken_inputs_bfd.py", "tests/test_hf_processor_config_required.py", "tests/test_taken_inputs_anisotropy.py",
                 "tests/test_options.py", "tests/test_bfd.py", "tests/test_mutation_kills_capture.py", KILLS_R30,
                 KILLS_R30_READ, KILLS_R31],
                "test_taken_inputs_bfd or test_hf_processor_config_required or test_mutation_kills_r30 or test_mutation_kills_r31 "
                "or (test_taken_inputs_anisotropy and keep_last) or (test_options and not cannot_read_the_source) or test_bfd "
                "or (test_mutation_kills_capture and hand_made_batch)"),
    # Round 32 (mutation): the library code of rounds 31 and 32 (`4a07a01..fcb421f`): round 31's geometry read in the layer
    # hook (capture.py's geometry_from_tokens, _tokens_geometry, _begin_batch's meta copy, meta["prefix_tokens"]),
    # analysis/geometry.py's layer_prefix_tokens, GroupViT's SegmentTokenSite / _UngriddedSite (models/hf.py), the BFD
    # reducers' refusal of windows (_one_sequence_an_image, _part_and_rows), refuse_mixed_batch_axes, a failed forward's
    # batch dropped (_drop_failed, _drop_open_batch), the hf: processor reader's errors (models/load.py), a merged view's
    # missing shards refused (store/reader.py), Recording.default_ids, a skipped item's own id (data/readers.py); round
    # 32's float16 overflow refusals (store/writer.py's _overflow, reducers' overflows / refuse_overflow, topk's
    # _map_peaks), Reducer.images_held and refuse_sinks_holding_images, same-object's chance per layer and top > k
    # refusal, analyze modes' re-ranking, report.py's chance reading. Against round 31's geometry, review and fixes
    # tests, round 32's fixes tests, test_bfd.py, test_modes.py, test_reducers.py, round 30's taken-inputs and
    # preprocessing tests, round 21's verify tests, the streamed duplicate-id refusal (refusal_help), the report's summary
    # and readings (modes_sections) and the kill files of rounds 31 and 32 (in-process tests). Run with --only ROUND32.
    "round32": (["qkhooks/analysis/anisotropy.py", "qkhooks/analysis/bfd.py", "qkhooks/analysis/bfd_reducers.py",
                 "qkhooks/analysis/geometry.py", "qkhooks/analysis/modes.py", "qkhooks/analysis/preference.py",
                 "qkhooks/analysis/recipes.py", "qkhooks/analysis/same_object.py", "qkhooks/analysis/topk.py",
                 "qkhooks/capture.py", "qkhooks/data/readers.py", "qkhooks/models/base.py", "qkhooks/models/hf.py",
                 "qkhooks/models/load.py", "qkhooks/reducers.py", "qkhooks/report.py", "qkhooks/store/reader.py",
                 "qkhooks/store/repair.py", "qkhooks/store/writer.py", "qkhooks/stream.py"],
                ["tests/test_layer_geometry_in_hooks.py", "tests/test_stream_skipped_ids_and_missing_shards.py", "tests/test_failed_forward_and_default_ids.py",
                 "tests/test_float16_overflow_and_held_reducers.py", "tests/test_bfd.py", "tests/test_taken_inputs_bfd.py", "tests/test_modes.py",
                 "tests/test_reducers.py", "tests/test_verify_run.py", "tests/test_hf_processor_config_required.py",
                 KILLS_IO, "tests/test_report.py", KILLS_R31, KILLS_R32],
                "test_layer_geometry_in_hooks or test_stream_skipped_ids_and_missing_shards or test_failed_forward_and_default_ids or test_float16_overflow_and_held_reducers or test_bfd or "
                "test_taken_inputs_bfd or test_modes or test_reducers or test_verify_run or test_hf_processor_config_required or "
                "(test_mutation_kills_io and streamed_id_seen_twice) or "
                "(test_report and (summary_has_every_section or readings_state)) or test_mutation_kills_r31 or "
                "test_mutation_kills_r32"),
    # Round 33 (mutation): round 32's later library code, the review fixes (`fcb421f..ebe8fa2`): the per-batch weights
    # check of live views (spectrum.py's weights_state, weights_unchanged, live_qk_tensors; capture.py's _check_weights,
    # detach), a given spectrum checked against the weights (is_cached_spectrum, foreign_spectrum, _layer_modes,
    # spectrum_of_other_weights), maps under autocast in float32 (projector.py), an unknown HF attention function and a
    # timm scale the fused path ignores refused (models/unsupported.py, timm.py's scale_attribute), model.train() inside
    # the context (_begin_batch), HF processors read as their class reads them and HF's centre crop
    # (data/preprocess.py, geometry.py), a dataset of another preprocessing refused (data/sources.py), tRNS, truncated
    # and animated images (data/display.py), symlinked subfolders (data/items.py), Recipe.reducers of a builtin, the
    # writer's overflow check by reducers.overflows and the resume's held-reducer check (stream.py's record_dataset:
    # decorated, mutated by hand). Against round 32's review, data, fixes and kill tests, the data, inputs, sources,
    # spectrum and weights-check tests, the from_hf kill files, round 21's precision tests, the given-spectrum tests of
    # the earlier kill files and round 33's kill file (in-process tests; not the three that check a warning's line,
    # which mutmut's trampoline moves: the stats pass failed on them). Run with --only ROUND33.
    "round33": (["qkhooks/capture.py", "qkhooks/data/display.py", "qkhooks/data/geometry.py", "qkhooks/data/items.py",
                 "qkhooks/data/preprocess.py", "qkhooks/data/sources.py", "qkhooks/models/base.py",
                 "qkhooks/models/timm.py", "qkhooks/models/unsupported.py", "qkhooks/projector.py",
                 "qkhooks/reducers.py", "qkhooks/spectrum.py", "qkhooks/store/writer.py", "qkhooks/stream.py"],
                ["tests/test_data_processor_pixels.py", "tests/test_capture_weights_and_spectra.py", "tests/test_float16_overflow_and_held_reducers.py", KILLS_R32,
                 "tests/test_data.py", "tests/test_inputs.py", "tests/test_sources.py", "tests/test_inference_mode_weights_check.py",
                 "tests/test_spectrum.py", KILLS_IO, "tests/test_mutation_kills_io2.py", "tests/test_low_precision_x_path.py",
                 "tests/test_mutation_kills_r20b.py", "tests/test_mutation_kills_r23.py", KILLS_CAPTURE, KILLS_R33],
                "(test_data_processor_pixels or test_capture_weights_and_spectra or test_float16_overflow_and_held_reducers or test_mutation_kills_r32 or test_data or "
                "test_inputs or test_sources or test_inference_mode_weights_check or test_spectrum or test_mutation_kills_io or "
                "test_mutation_kills_io2 or test_low_precision_x_path or test_mutation_kills_r33 or "
                "((test_mutation_kills_r20b or test_mutation_kills_r23 or test_mutation_kills_capture) and "
                "(given_spectrum or spectrum_of_inference_mode_weights_follows))) and not "
                "(live_record_of_a_model_dropping_at_random or live_layer_read_as_the_old_dict or "
                "guessed_preprocessing_warning_points_at_the_callers_line)"),
    # Round 34 (mutation): round 33's later library code and round 34's fixes (`ebe8fa2..b0ec42d`): masks read onto
    # tokens from the pixels each token shows (data/masks.py's TokenCells, token_cells, receptive_cells; the cells
    # handed through recipes.py and preference.py), PiT's pixel convolutions, the call's-grid sentinel and detection
    # tokens, dropped patches, a given spectrum of the other form, RoPE tables compared whole, flex_attention's
    # BlockMask, BFD's added relative-position term, its second pass and null modes (bfd.py, bfd_summary.py), repair of a
    # cut file, Fletcher-32 on checksummed statics, a merged view's shard run ids (distributed.py, store/reader.py),
    # damaged headers and attributes named (_hdf5.py), a checkpointed backward's read, any q/k pair seen as attention,
    # a plain h5py writer or its flag named, info on a live-written run, outputs="eager" nested, the same-object test's
    # labels, Pixio's and X-CLIP's tokens, analyze modes' incomplete note, timm's ParallelScalingBlock (models/parallel.py),
    # readings' infinite samples and untested layers, the compute_dtype refusal, a float64 model's spectrum, an fx copy's
    # q/k projection refused, the report's BFD share claims. Against round 33's review, token-cells and kill tests, round
    # 34's review tests (not the one holding a file open in another process), test_bfd.py (not its three 6-8 s run-file
    # and CLI tests), test_data.py, the readings tests, and the zoo's and map forms' parallel-block cases (in-process
    # tests). Run with --only ROUND34.
    "round34": (["qkhooks/analysis/bfd.py", "qkhooks/analysis/bfd_summary.py", "qkhooks/analysis/modes.py",
                 "qkhooks/analysis/preference.py", "qkhooks/analysis/recipes.py", "qkhooks/analysis/same_object.py",
                 "qkhooks/capture.py", "qkhooks/cli/analyze.py", "qkhooks/data/__init__.py", "qkhooks/data/masks.py",
                 "qkhooks/distributed.py", "qkhooks/models/__init__.py", "qkhooks/models/base.py",
                 "qkhooks/models/hf.py", "qkhooks/models/parallel.py", "qkhooks/models/rope.py",
                 "qkhooks/models/timm.py", "qkhooks/models/two_softmax.py", "qkhooks/models/unsupported.py",
                 "qkhooks/readings.py", "qkhooks/report.py", "qkhooks/sdpa.py", "qkhooks/spectrum.py",
                 "qkhooks/store/_hdf5.py", "qkhooks/store/format.py", "qkhooks/store/reader.py",
                 "qkhooks/store/repair.py", "qkhooks/store/writer.py", "qkhooks/stream.py"],
                ["tests/test_review_grids_bfd_damage.py", "tests/test_token_cells.py", KILLS_R33, "tests/test_review_writers_statistics_dtypes.py",
                 "tests/test_bfd.py", "tests/test_data.py", "tests/test_readings.py", "tests/test_readings_null_calibration.py",
                 "tests/test_zoo.py", "tests/test_map_forms.py", KILLS_R34, "tests/test_mutation_kills_models.py"],
                "(test_review_grids_bfd_damage or test_token_cells or test_mutation_kills_r33 or test_review_writers_statistics_dtypes or test_bfd or "
                "test_data or test_readings or test_mutation_kills_r34 or (test_zoo and fast_subset and (pwee or xp_)) or "
                "(test_map_forms and parallel_blocks) or an_hf_attention_owning_a_table_or_scale) and not "
                "(held_open_for_writing_by_plain_h5py or "
                "probe_split_is_the_same_for_shards or run_file_equals_in_memory_and_resumes or "
                "cli_writes_json_of_the_documented_shape or warnings_point_at_the_callers_line)"),
    # Round 37 (mutation): the library code of rounds 35-37 (`b0ec42d..9977ff1`, 33 library commits, 45 files): the
    # per-image softmax_attention / softmax_maps core (sdpa.py, attention.py), timm's ParallelThingsBlock as one stage,
    # float64 rebuilt maps, O3 / ADE20K names differing by extension, mid-run mask refusals as DataRefusals, files that
    # are no run refused by --resume / --overwrite, RunInterrupted and interruption_help, null modes, empty layer
    # selections, repair's ids and statics (copy_statics), symlinked run files, reducer states of other counts, file
    # sizes checked on resume, the per-batch q/k path checks (models/unsupported.py's watch_qk_path,
    # _refuse_replaced), capture's _partial_call / _ran_layers, BFD per-layer grids (bfd_reducers.py, bfd.py),
    # record_dataset's shard and resume checks (_checked_shard, _refuse_changed_stream, ItemStream.ids_before,
    # is_whole), the store's held_for_write / held_shards, the data items (bundled:NAME, open_image, path ids) and
    # models.base.conv_output_size. Against the round's own review tests (test_review_stages_names_interruptions.py, test_review_symlinks_repair_messages.py, test_hand_mutant_kills.py,
    # test_review_options_bfd_resume.py, test_capture_changes_inside_record.py, test_user_data_items.py) and test_fused_attention.py (softmax_attention against torch's SDPA, eager attention and
    # float64 numpy), in-process tests only: not the three that start another Python (a spawned DataLoader worker, a
    # writer in another process, a plain import) nor the two 10-12 s demo tests on the bundled DINOv2 photos. Run with
    # --only ROUND37 (and --sample: the module has tens of thousands of mutants).
    "round37": (["qkhooks/__init__.py", "qkhooks/_json.py", "qkhooks/analysis/__init__.py",
                 "qkhooks/analysis/bfd.py", "qkhooks/analysis/bfd_reducers.py", "qkhooks/analysis/bfd_summary.py",
                 "qkhooks/analysis/mode_figures.py", "qkhooks/analysis/modes.py", "qkhooks/analysis/preference.py",
                 "qkhooks/analysis/same_object.py", "qkhooks/attention.py", "qkhooks/capture.py",
                 "qkhooks/cli/__init__.py", "qkhooks/cli/analyze.py", "qkhooks/cli/spectrum.py",
                 "qkhooks/compare.py", "qkhooks/data/annotated.py", "qkhooks/data/datasets.py",
                 "qkhooks/data/items.py", "qkhooks/data/masks.py", "qkhooks/data/preprocess.py",
                 "qkhooks/data/readers.py", "qkhooks/data/sources.py", "qkhooks/data_files.py",
                 "qkhooks/distributed.py", "qkhooks/errors.py", "qkhooks/models/base.py", "qkhooks/models/hf.py",
                 "qkhooks/models/load.py", "qkhooks/models/parallel.py", "qkhooks/models/plain.py",
                 "qkhooks/models/reduced_keys.py", "qkhooks/models/rope.py", "qkhooks/models/timm.py",
                 "qkhooks/models/unsupported.py", "qkhooks/options.py", "qkhooks/readings.py", "qkhooks/report.py",
                 "qkhooks/sdpa.py", "qkhooks/store/_hdf5.py", "qkhooks/store/format.py", "qkhooks/store/reader.py",
                 "qkhooks/store/repair.py", "qkhooks/store/writer.py", "qkhooks/stream.py"],
                ["tests/test_review_stages_names_interruptions.py", "tests/test_review_symlinks_repair_messages.py", "tests/test_hand_mutant_kills.py",
                 "tests/test_review_options_bfd_resume.py", "tests/test_capture_changes_inside_record.py", "tests/test_user_data_items.py",
                 "tests/test_fused_attention.py", KILLS_R37],
                "not (spawned_worker_skips_what_the_main_process_skips or "
                "reader_opened_while_its_writer_ran_reads_the_states or submodules_named_in_the_readme_work_after "
                "or demos_defaults_are_the_installed_photos or demo_report_names_the_files_of_its_data)"),
    # Round 39 (mutation): the rest of round 37's run, which round 38's time box left (module "round37" ran its
    # sample's draws in 36 of its 45 files): the round-37 lines (`--only ROUND37`) of the nine files not run, with the
    # same tests, the kill file of round 39 (tests/test_mutation_kills_r38.py) and test_mutation_kills.py's attention
    # spec refusals (they kill `_from_string`'s re-worded refusal). Nine files, not 45: making the mutants takes a
    # minute, not 13. Run with --only ROUND37 --sample 50.
    "round37rest": (["qkhooks/stream.py", "qkhooks/models/unsupported.py", "qkhooks/store/_hdf5.py",
                     "qkhooks/store/repair.py", "qkhooks/store/format.py", "qkhooks/store/writer.py",
                     "qkhooks/attention.py", "qkhooks/capture.py", "qkhooks/sdpa.py"],
                    ["tests/test_review_stages_names_interruptions.py", "tests/test_review_symlinks_repair_messages.py", "tests/test_hand_mutant_kills.py",
                     "tests/test_review_options_bfd_resume.py", "tests/test_capture_changes_inside_record.py", "tests/test_user_data_items.py",
                     "tests/test_fused_attention.py", KILLS_R37, KILLS_R38, "tests/test_mutation_kills.py"],
                    "(test_review_stages_names_interruptions or (test_review_symlinks_repair_messages or test_hand_mutant_kills) or (test_review_options_bfd_resume or test_capture_changes_inside_record or test_user_data_items) or test_fused_attention or "
                    "test_mutation_kills_r37 or test_mutation_kills_r38 or attention_specs_parse_and_refuse_clearly) "
                    "and not (spawned_worker_skips_what_the_main_process_skips or "
                    "reader_opened_while_its_writer_ran_reads_the_states or submodules_named_in_the_readme_work_after "
                    "or demos_defaults_are_the_installed_photos or demo_report_names_the_files_of_its_data)"),
    # Round 39 (mutation): round 38's library code (`9977ff1..4f4469b`) in six of the 42 files it touched: capture.py's
    # q/k call bracket (`_qk_open`, `_close_qk`), thread checks, empty-batch refusal and per-batch copies;
    # models/unsupported.py's module-level hooks (`_OwnHook`, `_SpentHook`, `_CopiedHook`) and the functional_call
    # refusal; spectrum.py's edited-spectrum check (`_as_computed`, `_untouched`: `edit_stamps`, `unedited` since
    # round 39); cli/__init__.py's `output_file`;
    # bfd_summary.py's `check_alpha`; bfd.py's run_bfd checks. Against round 38's review tests (in-process only: not
    # the closed-pipe test, which starts another Python), round 39's kill file and test_spectrum.py's stored old-dict
    # read (its DeprecationWarning; the live one checks the warning's line, which mutmut's trampoline moves). Run with
    # --only ROUND38 --sample 25.
    "round38": (["qkhooks/capture.py", "qkhooks/models/unsupported.py", "qkhooks/spectrum.py",
                 "qkhooks/cli/__init__.py", "qkhooks/analysis/bfd_summary.py", "qkhooks/analysis/bfd.py"],
                ["tests/test_review_tubelets_spellings_train_mode.py", "tests/test_capture_shared_qkv_threads_copies.py", "tests/test_cli_refusals_before_work.py",
                 KILLS_R38, "tests/test_spectrum.py"],
                "((test_review_tubelets_spellings_train_mode or test_capture_shared_qkv_threads_copies or test_cli_refusals_before_work) or test_mutation_kills_r38 or stored_layer_read_as_the_old_dict) and not "
                "a_closed_pipe_stops_the_command_quietly"),
    # Round 40 (mutation): round 39's library code (`4f4469b..a0291ba`; the brief's `c8815ea..a0291ba` also holds 27 of
    # round 38's 39 commits, which the module "round38" ran) in 15 of the 22 library files it touched: the record()
    # spectrum copy at entry (spectrum.py `spectrum_copy`, `edit_stamps`, `unedited`; capture.py `_EntryModes`), file
    # times and hashes (data_files.py, stream.py `_resume`, `check_options`), attribute digests (store/format.py
    # `attr_digests`, writer.py, reader.py, repair.py's verify), merge checks (distributed.py `_check_blocks`,
    # `_refuse_no_room`, writer.py `checked_differences`), repair (`_refuse_unwritable`, the superblock rebuild,
    # store/_hdf5.py), cli/__init__.py (`run_file_folder`, `Terminated`), compare.py `_refuse_repeated`, BFD
    # (bfd_summary.py `_varies`, bfd.py) and the data readers (`_cell_path_id`, `_sample_meta`). Left out (a few lines
    # each, or text only): cli/bfd.py, cli/record.py, cli/report.py, analysis/preference.py, data/datasets.py,
    # data/sources.py, models/unsupported.py. Against round 39's review tests (in-process only: not the SIGTERM, ulimit
    # and FIFO tests, which start another Python), round 38's tests of the edited and truncated spectra, round 39's
    # refused-resume kill test and round 40's kill file. Run with --only ROUND39 --sample 60.
    "round39": (["qkhooks/spectrum.py", "qkhooks/capture.py", "qkhooks/data_files.py", "qkhooks/stream.py",
                 "qkhooks/store/writer.py", "qkhooks/store/format.py", "qkhooks/store/reader.py",
                 "qkhooks/store/repair.py", "qkhooks/store/_hdf5.py", "qkhooks/distributed.py",
                 "qkhooks/cli/__init__.py", "qkhooks/compare.py", "qkhooks/analysis/bfd.py",
                 "qkhooks/analysis/bfd_summary.py", "qkhooks/data/readers.py"],
                ["tests/test_attribute_digests.py", "tests/test_cli_compare_and_folder_refusals.py", "tests/test_spectrum_edits_and_dataparallel.py",
                 "tests/test_demo_checks_and_recopied_resume.py", "tests/test_merge_formats_and_old_mtimes.py", "tests/test_run_file_safety_adversarial.py",
                 "tests/test_review_tubelets_spellings_train_mode.py", "tests/test_capture_shared_qkv_threads_copies.py", KILLS_R38, KILLS_R39],
                "(test_attribute_digests or test_cli_compare_and_folder_refusals or test_spectrum_edits_and_dataparallel or test_demo_checks_and_recopied_resume or "
                "test_merge_formats_and_old_mtimes or test_run_file_safety_adversarial or test_mutation_kills_r39 or spectrum_edited_by_its_caller or "
                "truncated_spectrum_given_is_what or refused_resume_of_a_changed_stream_leaves) and not "
                "(before_writing_a_copy_that_cannot_fit or past_ulimit_f_before_writing or "
                "refuse_a_fifo_instead_of_waiting_forever)"),
    # Round 41 (mutation): round 41's library code (`6ff989d..0a58ba1`): a resume with a larger --limit
    # (stream.py `_extended_config`, renamed `_relimited_config` in round 42; `_stored_config`), a Subset of an
    # ImageFolder (data/readers.py `folder_reader`, `FolderReader.mask_layouts`), the hub probe (models/load.py
    # `_hub_unresolvable`, `_hub_cache_only_if_unresolvable`, `_load_timm`, `_load_hf`), items.py's `_named_as_path`,
    # `ImageDataset.file_of` / `files`, data_files.py's `_paths`. Against round 41's tests. Run with --only ROUND41.
    "round41": (["qkhooks/stream.py", "qkhooks/data/readers.py", "qkhooks/models/load.py", "qkhooks/data/items.py",
                 "qkhooks/data_files.py"],
                ["tests/test_limit_extension_and_stamps.py", "tests/test_hub_offline_switch.py", KILLS_R41],
                "(test_limit_extension_and_stamps or test_hub_offline_switch) or test_mutation_kills_r41"),
    # Round 42 (mutation): round 40's library code (`a0291ba..6ff989d`), never mutated before, in 16 of the 60 library
    # files it touched (most of the rest are two refactors, the models' q/k row readers moved to models/base.py and
    # private names made plain, or a few lines of messages in the CLI, compare.py, bfd_summary.py, lock.py, plots.py):
    # file stamps taken where files are read (data/items.py, data/readers.py, data/sources.py, data_files.py, stream.py), format 3 and attribute digests of a user's own attributes (store/format.py, writer.py,
    # repair.py), /images/skipped at each checkpoint and the full-disk message (stream.py, writer.py), preference's
    # refusals of rows with no positive patch mass or signed rows (analysis/preference.py), record_dataset's unknown
    # keyword (errors.py), the text-model refusal (models/hf.py, models/load.py), the ImageFolder named by its files
    # (data/readers.py), RunReader.data (store/reader.py), analyze_modes' split (analysis/modes.py), merge's messages
    # (distributed.py), bfd's stop messages (analysis/bfd.py). Against round 40's review tests, round 40's kill file of
    # round 39's code, the analyze-modes tests of test_modes.py / test_hf_path_columns_and_webdataset_ids.py and round 42's kill file; not
    # test_unsealed_attributes_and_full_disks's two "rechecks_the_room" tests, which name the caller of each room check from its frame
    # (traceback), a name mutmut's trampoline changes (x__refuse_no_room__mutmut_orig). Run with --only ROUND40
    # --sample 120.
    "round40": (["qkhooks/stream.py", "qkhooks/data/items.py", "qkhooks/data/readers.py", "qkhooks/data/sources.py",
                 "qkhooks/data_files.py", "qkhooks/store/format.py", "qkhooks/store/writer.py",
                 "qkhooks/store/repair.py", "qkhooks/store/reader.py", "qkhooks/distributed.py",
                 "qkhooks/analysis/preference.py", "qkhooks/analysis/bfd.py", "qkhooks/analysis/modes.py",
                 "qkhooks/errors.py", "qkhooks/models/hf.py", "qkhooks/models/load.py"],
                ["tests/test_image_folder_ids_and_text_models.py", "tests/test_qk_row_readers.py", "tests/test_unsealed_attributes_and_full_disks.py",
                 "tests/test_stamped_reads_and_float16_underflow.py", "tests/test_preference_patch_mass.py", "tests/test_file_stamps.py",
                 "tests/test_merge_and_compare_messages.py", "tests/test_modes.py", "tests/test_hf_path_columns_and_webdataset_ids.py", KILLS_R39,
                 KILLS_R42],
                "((test_image_folder_ids_and_text_models or test_qk_row_readers or test_unsealed_attributes_and_full_disks or test_stamped_reads_and_float16_underflow or test_preference_patch_mass or test_file_stamps or test_merge_and_compare_messages) or test_mutation_kills_r39 or test_mutation_kills_r42 or (test_modes and "
                "(cli_on_a or run_state_matches or negative_layers)) or (test_hf_path_columns_and_webdataset_ids and (analyze_modes or "
                "one_image_runs_same_object))) and not rechecks_the_room_before_each_write"),
    # Round 42 (lead): round 42's own library code (`09a2bd0..` the round's end): torchvision's ViT (models/torchvision.py,
    # the `torchvision:` specs in models/load.py and its resolver probe `_does_not_resolve`, outputs="eager" through
    # nn.MultiheadAttention's multi_head_attention_forward in sdpa.py / attention.py), a lower --limit for a stopped
    # extension (stream.py `_relimited_config`, `_stored_config`), a bend's inner extreme named as the inner layers'
    # (readings.py), the augmented spectrum's cosine convention in `qkhooks spectrum --json` (cli/spectrum.py). Against
    # the round's tests. Run with --only ROUND42.
    "round42": (["qkhooks/models/torchvision.py", "qkhooks/models/load.py", "qkhooks/sdpa.py", "qkhooks/attention.py",
                 "qkhooks/stream.py", "qkhooks/readings.py", "qkhooks/cli/spectrum.py"],
                ["tests/test_torchvision_vit.py", "tests/test_lower_limit_after_extension.py", "tests/test_readings_bend_sentences.py",
                 "tests/test_torchvision_adapter_edge_cases.py", "tests/test_review_limits_checkpoints_bends.py",
                 "tests/test_limit_extension_and_stamps.py", "tests/test_hub_offline_switch.py", "tests/test_readings_null_calibration.py", KILLS_R41,
                 KILLS_R42B],
                "test_torchvision_vit or (test_lower_limit_after_extension or test_review_limits_checkpoints_bends or test_torchvision_adapter_edge_cases or test_readings_bend_sentences) or (test_limit_extension_and_stamps or test_hub_offline_switch) or test_readings_null_calibration or "
                "test_mutation_kills_r41 or test_mutation_kills_r42b"),
    # Round 43 (lead): a resume drops the heap references a killed writer left past the committed ids and past the
    # skipped list (store/format.py `drop_stale_heap_references`, its call in RunWriter._open_for_resume), against the
    # tests that leave such references and the cut's (every resume runs the function: the store's and checksum's
    # resume tests made a mutant a minute). No test name here may hold "killed" (IN_A_SUBPROCESS leaves those out).
    # Run with --only ROUND43.
    "round43": (["qkhooks/store/format.py", "qkhooks/store/writer.py"],
                ["tests/test_store_safety.py", "tests/test_mutation_kills_r28b.py"],
                "heap_references or readers_see_only_committed or resumes_from_no_image or skipped_list_grows or "
                "skipped_rows_that_read or before_the_skipped_list or skipped_rows_read_up"),
    # Round 44 (lead): the run-file code round 44 wrote (`625ad37..91dc98b`): a skipped list whose rows do not all
    # read, or that is not laid out as qkhooks writes it, said everywhere it is read (store/format.py, reader.py,
    # repair.py, distributed.py); repair of a cut file: the rows of a raw chunk before the cut, strings whose heap
    # collection lies outside the file (repair.py), the ids written before a batch's arrays (writer.py). Against the
    # round's tests, not the heap-collection cut's, which runs repair in a child process. Run with --only ROUND44.
    # Round 45 (mutation): with the tests that reach repair's ids read a block, then a row, at a time (test_review_symlinks_repair_messages's
    # damaged heap collection: the only one; test_repair_shards_and_short_arrays's and test_ids_checksum's repairs read the ids whole,
    # the cut ids and the flipped digest kept for _copy's lines after the read) and round 45's kill file.
    "round44": (["qkhooks/store/format.py", "qkhooks/store/reader.py", "qkhooks/store/repair.py",
                 "qkhooks/distributed.py", "qkhooks/store/writer.py"],
                ["tests/test_store_safety.py", "tests/test_repair_cut_files.py", "tests/test_review_symlinks_repair_messages.py",
                 "tests/test_repair_shards_and_short_arrays.py", "tests/test_ids_checksum.py", KILLS_R45],
                "half_written or unreadable_skipped or whose_skipped_list or not_laid_out or reads_no_skipped or "
                "keeps_the_runs_skipped or cut_through or uncut_run_repairs or raw_chunks or unused_room or "
                "handed_to_each or narrower_than or wherever_a_run_is_cut or skipped_rows_read_up or "
                "reads_whole_merges or first_five or ids_outside_a_damaged_heap or cut_shorter_than_committed or "
                "flipped_digest_fails or test_mutation_kills_r45"),
    # Round 46 (mutation): round 45's library code (`84a8854..dbca73b`): repair's attributes whose string a cut left
    # outside the file (`_attrs_outside`, `_torn_collection`, `_heap_references`), the skipped rows read past a lost
    # one (format's `read_skipped_rows`, `skipped_loss_words`, `row_spans`; reader, distributed), the resume's lower
    # --limit judged by the kept images and its unnameable streams (stream.py), the data fixes (sources, items,
    # preprocess), masks outside [0, 1] (masks, preference), tied sigma (spectrum, bfd_summary), torchvision's
    # `_replaced_on_model` and repair's `_chunk_at` (`f9fc973`). Against the round's tests, round 44's store tests
    # (round44's expression) and the tests those files' older lines need; not the kill file's stacklevel test
    # (mutmut's trampoline adds frames). Run with --only ROUND45.
    "round45": (["qkhooks/store/repair.py", "qkhooks/store/format.py", "qkhooks/store/reader.py",
                 "qkhooks/distributed.py", "qkhooks/stream.py", "qkhooks/data/sources.py", "qkhooks/data/items.py",
                 "qkhooks/data/preprocess.py", "qkhooks/data/masks.py", "qkhooks/analysis/preference.py",
                 "qkhooks/analysis/bfd_summary.py", "qkhooks/spectrum.py", "qkhooks/models/torchvision.py"],
                ["tests/test_repair_torn_attributes.py", KILLS_R45, "tests/test_tied_sigma_and_unit_ranges.py",
                 "tests/test_user_data_path.py", "tests/test_resume_lower_limit.py", "tests/test_repair_cut_files.py",
                 "tests/test_store_safety.py", "tests/test_review_symlinks_repair_messages.py", "tests/test_mutation_kills_r19.py",
                 "tests/test_lower_limit_after_extension.py", "tests/test_torchvision_vit.py", "tests/test_torchvision_adapter_edge_cases.py",
                 KILLS_R46],
                "test_repair_torn_attributes or test_mutation_kills_r45 or (test_user_data_path or test_tied_sigma_and_unit_ranges) or test_resume_lower_limit or "
                "test_repair_cut_files or half_written or unreadable_skipped or whose_skipped_list or not_laid_out or "
                "asks_no_skipped or keeps_every_skipped or lost_skipped_row or keeps_the_runs_skipped or "
                "skipped_rows_read_up or reads_whole_merges or first_five or ids_outside_a_damaged_heap or "
                "null_modes or stopped_extension or stopped_midway or (test_torchvision_vit and replaced) or "
                "accelerates_device_only or (test_mutation_kills_r46 and not points_at_the_callers_line)"),
    # Round 47 (mutation): round 46's library code (`dbca73b..2885a7a`): the writer's SWMR metadata blocks
    # (`_hdf5.meta_block_bytes`, `open_swmr_writer`), repair's empty strings (address > 0) and the statics' and reducer
    # states' attributes left unread (`copy_statics`' `outside`, `STATE_ATTRS`), one-row spans said as their row
    # (`format.span_words` and its callers in repair, reader, format), images held as bytes or in memory hashed and
    # checked on a resume (readers' `_held_bytes` / `_held_hash` / `held_hashes`, sources, stream's
    # `_refuse_changed_held` / `_held_or_file_hashes`), `ImageConfig.from_hf` of a processor object, masks' "patches".
    # Against the round's tests (not test_bundled_dinov2_no_tied_sigma's real model), the repair, verify and stamp tests those
    # files' older lines need (not the cuts at every offset: 6-13 s each), and the new kill file; since its run, round
    # 32's whole missing-shards sentence and test_repair_shards_and_short_arrays (the rows past an array's end), which killed survivors the
    # selection had left out. The bench harness (benchmarks/) is not library code. Run with --only ROUND46.
    "round46": (["qkhooks/store/_hdf5.py", "qkhooks/store/repair.py", "qkhooks/store/format.py",
                 "qkhooks/store/reader.py", "qkhooks/store/writer.py", "qkhooks/stream.py", "qkhooks/data/sources.py",
                 "qkhooks/data/readers.py", "qkhooks/data/preprocess.py", "qkhooks/data/masks.py"],
                ["tests/test_run_file_metadata_blocks.py", "tests/test_repair_torn_empty_strings.py",
                 "tests/test_resume_hf_image_bytes.py", "tests/test_resume_in_memory_images.py",
                 "tests/test_hf_processor_backends.py", "tests/test_row_span_words.py", KILLS_R46,
                 "tests/test_repair_torn_attributes.py", "tests/test_repair_cut_files.py", KILLS_R45,
                 "tests/test_verify_run.py", "tests/test_file_stamps.py", "tests/test_mutation_kills_r32.py",
                 "tests/test_repair_shards_and_short_arrays.py", KILLS_R47],
                "test_run_file_metadata_blocks or test_repair_torn_empty_strings or test_resume_hf_image_bytes or "
                "test_resume_in_memory_images or test_hf_processor_backends or test_row_span_words or "
                "(test_mutation_kills_r46 and not points_at_the_callers_line) or test_repair_torn_attributes or "
                "(test_repair_cut_files and not (wherever_a_run_is_cut or in_bounded_time)) or "
                "test_mutation_kills_r45 or (test_verify_run and not does_not_open) or test_file_stamps or "
                "gone_first_shard_names or shard_sources_are_read_once or test_repair_shards_and_short_arrays or "
                "test_mutation_kills_r47"),
    # Round 48 (mutation): round 47's library code (`2885a7a..13f19ad`): merge --copy's order (every object before the
    # rows: `_merge_per_image`'s returned fill, `_write_merged`) and its metadata block (`_merged_meta_block`,
    # `_hdf5.merged_meta_block_bytes`, `create_run_file(meta_block=)`), repair's walk past the reducer states
    # (format's `datasets` / `per_image_datasets` `skip`, `_states_inside`' unopened link), a torch Dataset's and an
    # iterable's kept images read again on a resume (readers' `MapReader._read_again` / `_kept` / `read_again_cut`,
    # `READ_AGAIN_BUDGET`, `ReadInPassing`, `_stamp_held`, `_kept_stamp`, `_item_id`, `_checking`'s bar after
    # `CHECK_BAR_DELAY`, HF's `first`; sources' `_Replay`, `reads_again`; stream's `_recorded_order`,
    # `_refuse_other_items`, the budget's warning, `_duration`, `held_hint`). Against the round's tests, the held-image
    # and stamp tests the changed lines' callers need, round 38's first-lacking-image refusal, the streamed shard's
    # resume, round 42/46/47's kill files (their resume tests took round 47's contract) and the new kill file; not the
    # kill file r46's stacklevel test (mutmut's trampoline adds frames). Run with --only ROUND47.
    "round47": (["qkhooks/data/readers.py", "qkhooks/data/sources.py", "qkhooks/stream.py", "qkhooks/distributed.py",
                 "qkhooks/store/_hdf5.py", "qkhooks/store/format.py", "qkhooks/store/repair.py"],
                ["tests/test_resume_held_images_check_progress.py", "tests/test_merge_copy_cuts.py",
                 "tests/test_run_file_metadata_blocks.py", "tests/test_resume_hf_image_bytes.py",
                 "tests/test_resume_in_memory_images.py", "tests/test_user_data_path.py", "tests/test_file_stamps.py",
                 "tests/test_mutation_kills_r38.py", "tests/test_mutation_kills_io.py", KILLS_R42, KILLS_R46, KILLS_R47,
                 KILLS_R48],
                "test_resume_held_images_check_progress or test_merge_copy_cuts or test_run_file_metadata_blocks or "
                "test_resume_hf_image_bytes or test_resume_in_memory_images or test_user_data_path or test_file_stamps "
                "or names_the_first_image_it_lacks or streamed_shard_interrupted_then_resumed or "
                "test_mutation_kills_r42 or (test_mutation_kills_r46 and not points_at_the_callers_line) or "
                "test_mutation_kills_r47 or test_mutation_kills_r48"),
    # Round 49 (mutation): round 48's library code (`368b4c5..edf303a`): masks refused where a module on the image's way
    # to the tokens may move them (`AttentionSite.pixel_route`, the timm / HF / torchvision / timm-backbone
    # `_pixel_route`, unsupported's `refuse_moved_pixels` / `moves_pixels` / `_changes_image` / `_foreign_hook` /
    # `_foreign`, stream's `mask_cells` route check, torchvision's stem check, PiT's weakly held `pixel_convs`,
    # capture's `sites_release`), the resume's order check read whole (`_recorded_order`, `_refuse_other_items`),
    # readers' `ReadInPassing._read_again(first=)`, `check_bar`, the tar reader's `_after_stamps`, the check bar of
    # retimed files, `resume_ids_only` and merge's join of `format.UNCHECKED_RESUMES`. base.py (a dataclass field) and
    # format.py (a constant) hold no mutant of those lines and are left out. Against the round's tests (the token cells,
    # torchvision's conv stem, the hooks refused, the held-image and stamp resumes, the keeps-no-model-alive cases,
    # r34's mask_cells stand-in), the kill files r48 and r49. Run with --only ROUND48.
    "round48": (["qkhooks/capture.py", "qkhooks/models/hf.py", "qkhooks/models/timm.py", "qkhooks/models/timm_backbone.py",
                 "qkhooks/models/torchvision.py", "qkhooks/models/unsupported.py", "qkhooks/stream.py",
                 "qkhooks/data/readers.py", "qkhooks/data/sources.py", "qkhooks/distributed.py"],
                ["tests/test_token_cells.py", "tests/test_torchvision_vit.py", "tests/test_foreign_hooks_refused.py",
                 "tests/test_zoo.py", "tests/test_relpos.py", "tests/test_resume_held_images_check_progress.py",
                 "tests/test_file_stamps.py", "tests/test_resume_in_memory_images.py",
                 "tests/test_resume_hf_image_bytes.py", "tests/test_mutation_kills_r34.py", KILLS_R48, KILLS_R49],
                "test_token_cells or (test_torchvision_vit and (conv_stem or stems_cells)) or test_foreign_hooks_refused "
                "or keeps_no_model_alive or test_resume_held_images_check_progress or test_file_stamps or "
                "test_resume_in_memory_images or test_resume_hf_image_bytes or "
                "(test_mutation_kills_r34 and convolutions_make_another_grid) or test_mutation_kills_r48 or "
                "test_mutation_kills_r49"),
    # Round 50 (mutation): round 49's library code (`edf303a..81bab99`): the resume's order check of every source read
    # again (wds, a torch Dataset's or an iterable's run from before the stamps, `resume_ids_only`), the HF cell's
    # `_held_bytes_hash`, repair's invalid UTF-8 attributes and statics cut past the end, merged --checksum reducer
    # states, zeroed checksummed chunks, a repaired copy's lost spectrum array, the image-to-token routes of Gemma 4,
    # HF LeViT and PiT's poolings and the foreign-hook route check, recordings that keep no model alive (LeViT, SHViT,
    # CaiT, EfficientFormer-v2, differential / GPSA, q/k norms), TimmBackbone's PiT and timm's features_only nets,
    # the first-forward refusal on every path, run_bfd's resume to another limit, the modes summary's cos_weighted
    # without the anisotropy state. report.py's one line (modes_sections' rows with a baseline) is left out: only the
    # full modes report reaches it. Against the round's new and changed tests and the kill file r50. Run with
    # --only ROUND49.
    "round49": (["qkhooks/analysis/anisotropy.py", "qkhooks/analysis/bfd.py", "qkhooks/analysis/modes.py",
                 "qkhooks/capture.py", "qkhooks/data/readers.py", "qkhooks/data/sources.py", "qkhooks/distributed.py",
                 "qkhooks/models/biased.py", "qkhooks/models/class_attention.py", "qkhooks/models/gemma4.py",
                 "qkhooks/models/hf_levit.py", "qkhooks/models/levit.py", "qkhooks/models/timm.py",
                 "qkhooks/models/timm_backbone.py", "qkhooks/models/two_softmax.py", "qkhooks/models/unsupported.py",
                 "qkhooks/store/format.py", "qkhooks/store/reader.py", "qkhooks/store/repair.py", "qkhooks/stream.py"],
                ["tests/test_token_cells.py", "tests/test_file_stamps.py", "tests/test_resume_held_images_check_progress.py",
                 "tests/test_zoo.py", "tests/test_attribute_digests.py", "tests/test_checksum.py",
                 "tests/test_repair_cut_files.py", "tests/test_repair_torn_attributes.py", "tests/test_bfd.py",
                 "tests/test_multigrid_runs.py", "tests/test_modes.py", "tests/test_mutation_kills_io.py",
                 "tests/test_mutation_kills_r34.py", "tests/test_mutation_kills_r42.py", "tests/test_mutation_kills_r46.py",
                 KILLS_R50],
                "test_token_cells or test_file_stamps or test_resume_held_images_check_progress or "
                "(test_zoo and keeps_no_model_alive) or (test_attribute_digests and resume_by_ids_alone) or "
                "(test_checksum and (merged_checksum_copys_reducer_states or chunk_zeroed_whole)) or "
                "(test_repair_cut_files and static_whose_data_a_cut_left) or (test_repair_torn_attributes and invalid_utf8) "
                "or (test_bfd and resume_to_another_limit) or (test_multigrid_runs and (first_forward_fails or "
                "first_batch_of_a_model_that_runs)) or (test_modes and without_the_anisotropy_state) or "
                "(test_mutation_kills_io and probe_geometry_runs_one_forward) or "
                "(test_mutation_kills_r34 and anisotropy_note) or (test_mutation_kills_r42 and (wds_resume or "
                "streamed_resume or without_the_anisotropy_reducer)) or (test_mutation_kills_r46 and "
                "kept_in_memory_items_are_unchecked) or (test_mutation_kills_r50 and not points_at_the_callers_line)"),
    # Round 51 (mutation): round 50's library code (`81bab99..bebb0cb`): masks refused where someone else's hook follows
    # timm's feature hook or a module of the user's own class may move the tokens (unsupported's `_foreign_moving`,
    # `_own_class_code`, `moves_pixels`; torchvision's stem), timm's feature nets around a user's model or a network
    # whose blocks embed patches, all-zero recorded rows stored as -0.0 (format's `signed_zero_rows`, the writer),
    # zeroed chunks of the file sizes and hashes, the ids' heap collection read off the file's bytes (`_hdf5`'s
    # `heap_reference_layout` / `unreadable_strings`, moved from repair, and repair's use of them; one id not UTF-8),
    # the first-forward refusal's wording, the resumes of runs from before the file stamps (stream, readers, sources),
    # images without display colours, PNGs without IEND, O3's 16-bit masks, ADE20K's upper-case .PNG, Synology's
    # @eaDir (data/), query tokens kept (B, T) and refused as the batch ends (capture, attention), negative attention
    # layers. Against the round's new and changed tests (not test_data.py's Synology test: it checks the warning's
    # stacklevel, which mutmut's trampoline moves; r51 checks that warning whole), r50's two tests of the pre-stamp
    # resume's warning (whole, and once for a list), which round 50 rewrote, and the kill file r51 (its stacklevel test
    # left out by name, for the same reason). Run with --only ROUND50.
    "round50": (["qkhooks/attention.py", "qkhooks/capture.py", "qkhooks/data/annotated.py", "qkhooks/data/datasets.py",
                 "qkhooks/data/display.py", "qkhooks/data/items.py", "qkhooks/data/readers.py", "qkhooks/data/sources.py",
                 "qkhooks/models/timm.py", "qkhooks/models/torchvision.py", "qkhooks/models/unsupported.py",
                 "qkhooks/store/_hdf5.py", "qkhooks/store/format.py", "qkhooks/store/repair.py",
                 "qkhooks/store/writer.py", "qkhooks/stream.py"],
                ["tests/test_token_cells.py", "tests/test_file_stamps.py", "tests/test_data_unreadable_files.py",
                 "tests/test_ids_heap_damage.py", "tests/test_capture_shared_qkv_threads_copies.py",
                 "tests/test_checksum.py", "tests/test_data.py", "tests/test_data_spec_grammar.py",
                 "tests/test_newcomer_messages.py", "tests/test_multigrid_runs.py", "tests/test_mutation_kills_io.py",
                 "tests/test_mutation_kills_r26.py", "tests/test_mutation_kills_r42.py", "tests/test_mutation_kills_r45.py",
                 "tests/test_mutation_kills_r46.py", "tests/test_mutation_kills_r47.py", "tests/test_repair_cut_files.py",
                 KILLS_R50, KILLS_R51],
                "test_token_cells or test_file_stamps or test_data_unreadable_files or test_ids_heap_damage or "
                "(test_capture_shared_qkv_threads_copies and (per_batch_tokens or tokens_given_as_one_row)) or "
                "(test_checksum and (chunk_zeroed_whole or all_zero or zeroed_chunk_of_an_images_file_size)) or "
                "(test_data and (ade20k or o3dir)) or (test_data_spec_grammar and an_ade20k_item_opens) or "
                "(test_newcomer_messages and attention_layers) or (test_multigrid_runs and (first_forward_fails or "
                "fails_on_its_configured_input_size)) or (test_mutation_kills_io and probe_geometry_runs_one_forward) or "
                "(test_mutation_kills_r26 and ids_chunk_fails) or (test_mutation_kills_r42 and streamed_resume) "
                "or (test_mutation_kills_r45 and (heap_collection_ends_past or second_chunk_of_ids or "
                "chunk_of_ids_whose_place)) or (test_mutation_kills_r46 and (size_field_reads_zero or "
                "superblock_of_other_sizes)) or (test_mutation_kills_r47 and rows_whose_string_was_never_written) or "
                "(test_repair_cut_files and string_lies_outside) or (test_mutation_kills_r50 and (warns_whole_and_lists_no_resume "
                "or warns_once_that_it_checks_ids_alone)) or (test_mutation_kills_r51 and not "
                "points_at_the_callers_line)"),
}
# The round-18 functions' mutant names (fnmatch patterns), for `--only` with the module "round18". Round 18's `_solve`
# and `_solve_side` are gone (round 19 made them `QKPathSolution` and `_SideSolution`, later code: not named here).
ROUND18 = (
    "qkhooks.projector.x_qk_path_check__*",
    "qkhooks.spectrum.x_head_weighted_cosines__*", "qkhooks.spectrum.x_mean_over_heads__*",
    "qkhooks.spectrum.x_null_modes__*", "qkhooks.spectrum.xǁLayerSpectrumǁnull_modes__*",
    "qkhooks.spectrum.xǁLayerSpectrumǁall_modes__*", "qkhooks.spectrum.xǁLayerSpectrumǁcosine_weighted__*",
    "qkhooks.spectrum.xǁLayerSpectrumǁtop__*", "qkhooks.spectrum.xǁQKSpectrumǁcosine_weighted_by_layer__*",
    "qkhooks.analysis.anisotropy.x_baseline_pivots__*", "qkhooks.analysis.anisotropy.x__weighted_cos__*",
    "qkhooks.analysis.anisotropy.x_anisotropy_table__*",
    "qkhooks.stream.x_weights_fingerprint__*",
    "qkhooks.store.writer.xǁRunWriterǁ_check_identity__*", "qkhooks.store.writer.x_checked_attrs__*",
    "qkhooks.store.writer.xǁRunWriterǁ_lay_out__*", "qkhooks.store.writer.xǁRunWriterǁ_publish__*",
    "qkhooks.store.writer.xǁRunWriterǁ_replace_old__*",
    "qkhooks.store.lock.xǁWriterLockǁhold_run__*",
    "qkhooks.data_files.*",
    "qkhooks.models.base.x__positional_names__*", "qkhooks.models.base.x__positional_parameters__*",
    "qkhooks.models.base.xǁAttentionSiteǁrefuse_unmodelled_inputs__*", "qkhooks.models.base.x_recast__*",
    "qkhooks.models.base.x_grid_source_hooks__*",
)
# The round-19 functions' mutant names (fnmatch patterns), for `--only` with the module "round19". Those other
# helpers of round 20 were refactoring (reader._from_hdf5, writer._check_whole, base._paths_as_indices, options.py)
# are last in the list, so a partial run reaches them last.
ROUND19 = (
    "qkhooks.reducers.x_refuse_non_finite__*",
    "qkhooks.analysis.bfd_reducers.x_is_held_out__*", "qkhooks.analysis.bfd_reducers.xǁPositionDecodingǁupdate__*",
    "qkhooks.analysis.bfd_summary.x_refuse_no_content__*",
    "qkhooks.data.masks.x_refuse_overlap__*", "qkhooks.analysis.preference.x__image_names__*",
    "qkhooks.analysis.preference.xǁPreferenceReducerǁupdate__*",
    "qkhooks.capture.x_modes_kept__*",
    "qkhooks.models.base.x__is_path__*", "qkhooks.models.base.x__block_index__*",
    "qkhooks.models.load.x_refuse_meta__*",
    "qkhooks.store.format.x_as_str__*", "qkhooks.store.format.x_read_ids__*", "qkhooks.store.format.x_read_skipped__*",
    "qkhooks.store.format.x_identity_of__*", "qkhooks.store.format.x_chunk_index_readable__*",
    "qkhooks.store.reader.xǁRunArrayǁ_read__*", "qkhooks.store.reader.xǁRunReaderǁ__init____*",
    "qkhooks.store.reader.xǁRunReaderǁmodes_kept__*", "qkhooks.store.reader.xǁRunReaderǁmode_source__*",
    "qkhooks.store._hdf5.xǁBackoffǁ*",
    "qkhooks.store.writer.xǁRunWriterǁ_damaged__*", "qkhooks.store.writer.xǁRunWriterǁ_refused_if_damaged__*",
    "qkhooks.store.format.x_per_image_datasets__*",  # since round 20 it also reads every attribute (was _read_every_object)
    "qkhooks.models.base.x__paths_as_indices__*", "qkhooks.store.writer.xǁRunWriterǁ_check_whole__*",
)
# The round-20 functions' mutant names, for `--only` with the module "round20". Of the reader's summary only the
# mutants of the checksum line round 20 added: those on the lines its commit `69f4b30` wrote and no later one rewrote
# (:func:`written_by`; 23 at `f2eeb12`, where the numbers 27, 28, 30-32, 62-79 given at `19f6ec5` had drifted to other
# lines); the same commit's two lines of `repair._copy` (the checksum and the rows it lost, carried into the repaired
# file: 16 mutants) come with them.
# RunReader._reading is a context manager, which mutmut does not mutate.
ROUND20 = (
    "qkhooks.capture.x__layer_modes__*", "qkhooks.access.x_layer_at_path__*", "qkhooks.access.x_resolve_layer__*",
    "qkhooks.models.base.x__paths_as_indices__*",
    "qkhooks.data_files.x_file_size_column__*", "qkhooks.data_files.x_recorded_sizes__*",
    "qkhooks.data_files.x_changed_files__*", "qkhooks.data_files.x__size__*", "qkhooks.data_files.x__absolute_part__*",
    "qkhooks.stream.xǁWriterSinkǁupdate__*",
    "qkhooks.data.items.x__read_photo__*", "qkhooks.data.items.x__exif_orientation__*",
    "qkhooks.data.items.x__png_exif_after_data__*", "qkhooks.data.items.x__file_orientation__*",
    "qkhooks.data.items.x__shown_frame__*", "qkhooks.data.items.x__unreadable_refused__*",
    "qkhooks.data.items.x__read_mask_file__*", "qkhooks.data.datasets.x_open_dataset__*",
    "qkhooks.store.reader.x__from_hdf5__*", "qkhooks.store.reader.xǁRunReaderǁ_reading__*",
    "commits:69f4b30^..69f4b30",
    "qkhooks.store.repair.x__readable_rows__*",
    "qkhooks.store.writer.xǁRunWriterǁ_follow_file_layout__*", "qkhooks.store.writer.xǁRunWriterǁ_create_per_image__*",
    "qkhooks.store.writer.xǁRunWriterǁ_check_whole__*",
    "qkhooks.store.format.x_per_image_datasets__*", "qkhooks.store._hdf5.x_open_swmr_writer__*",
)
# The round-21 functions' mutant names, for `--only` with the module "round21". Recording.mode_source is a property
# and items._unreadable_refused a context manager (mutmut mutates neither; their tests run all the same).
ROUND21 = (
    "qkhooks.data.items.x__file_fault__*", "qkhooks.data.items.x__unreadable_refused__*",
    "qkhooks.data.items.x__read_oriented__*", "qkhooks.data.items.x__read_photo__*",
    "qkhooks.data.readers.x__photo_masks__*", "qkhooks.data.readers.x__item_to_raw__*",
    "qkhooks.store.repair.x__readable_rows__*", "qkhooks.store.repair.x__failing_rows__*",
    "qkhooks.store.repair.x__rows_line__*", "qkhooks.store.repair.x__copy_attrs__*",
    "qkhooks.store.repair.x__past_the_end__*", "qkhooks.store.repair.x__copy__*",
    "qkhooks.store.repair.x_verify_run__*",
    "qkhooks.store.repair.x__verify__*", "qkhooks.store.repair.xǁVerifyReportǁsummary__*",
    "qkhooks.store.repair.xǁVerifyReportǁ_checksum_line__*", "qkhooks.store.repair.x__missing_sources__*",
    "qkhooks.store.format.x_datasets__*", "qkhooks.store.format.x_per_image_datasets__*",
    "qkhooks.store.format.x_layout_problems__*",
    "qkhooks.store.reader.xǁRunArrayǁ_read__*", "qkhooks.store.reader.xǁRunArrayǁ_read_images__*",
    "qkhooks.store.reader.xǁRunArrayǁ_image_indices__*", "qkhooks.store.reader.x__spans__*",
    "qkhooks.store.writer.xǁRunWriterǁ_follow_file_layout__*", "qkhooks.store.writer.xǁRunWriterǁ_create_per_image__*",
    "qkhooks.store._hdf5.x_open_swmr_writer__*",
    "qkhooks.access.x_layer_at_path__*",
    "qkhooks.capture.xǁRecordingǁ_check_weights__*", "qkhooks.capture.xǁRecordingǁ_qk_path_serves__*",
    "qkhooks.capture.x__full_precision_qk__*", "qkhooks.capture.x__autocast_dtype__*",
    "qkhooks.capture.xǁRecordingǁmode_source__*", "qkhooks.capture.xǁRecordingǁpin_mode_source__*",
    "qkhooks.capture.xǁRecordingǁ_x_projector__*",
    "qkhooks.spectrum.x_weights_state__*", "qkhooks.spectrum.x_same_weights__*", "qkhooks.spectrum.x__weights_key__*",
    "qkhooks.models.unsupported.x_refuse_unplain_qk__*", "qkhooks.models.unsupported.x__known_forward__*",
    "qkhooks.models.unsupported.x_tensors_read__*",
    "qkhooks.sdpa.x_scaled_logits__*",
)
# The round-22 functions' mutant names, for `--only` with the module "round22". spectrum._memcmp
# (functools.cache) and readings._resamples (functools.lru_cache) are decorated: mutmut mutates neither; their tests
# run all the same.
ROUND22 = (
    "qkhooks.models.unsupported.x_own_hook__*", "qkhooks.models.unsupported.x_remove_own_hooks__*",
    "qkhooks.models.unsupported.x__name__*", "qkhooks.models.unsupported.x__known_forward__*",
    "qkhooks.models.unsupported.x_qk_scope__*", "qkhooks.models.unsupported.x_refuse_unplain_qk__*",
    "qkhooks.models.unsupported.x_refuse_altered_qk__*", "qkhooks.models.unsupported.x__refuse_patched_forward__*",
    "qkhooks.models.unsupported.x_moves_devices_only__*", "qkhooks.models.unsupported.x_accelerate_hooks__*",
    "qkhooks.models.unsupported.x_accelerate_offloading__*", "qkhooks.models.unsupported.x__refuse_qk_module__*",
    "qkhooks.spectrum.x__qk_tensors__*", "qkhooks.spectrum.x__same_bits__*", "qkhooks.spectrum.x_weights_state__*",
    "qkhooks.spectrum.x__copied_state__*", "qkhooks.spectrum.x_same_weights__*",
    "qkhooks.spectrum.x_layer_spectrum__*",
    "qkhooks.store.reader.x__spans__*", "qkhooks.store.reader.x__axis_names__*",
    "qkhooks.store.reader.xǁRunArrayǁ_check_integers__*", "qkhooks.store.reader.xǁRunArrayǁ_read_images__*",
    "qkhooks.store.reader.xǁ_SharedFileǁ*", "qkhooks.store.reader.xǁRunReaderǁ__init____*",
    "qkhooks.store.reader.xǁRunReaderǁ_open__*", "qkhooks.store.reader.xǁRunReaderǁclose__*",
    "qkhooks.store.reader.xǁRunReaderǁstate__*", "qkhooks.store.reader.xǁRunReaderǁ_no_state__*",
    "qkhooks.readings.x__bootstrap_t__*", "qkhooks.readings.x__bounds__*", "qkhooks.readings.x_intervals__*",
    "qkhooks.readings.x_layer_intervals__*", "qkhooks.readings.x__too_few__*",
)
# The round-23 functions' mutant names, for `--only` with the module "round24". RunWriter.__init__ and
# Recording.__init__ (two attributes, one call added to long functions) are left out; the module-level constants
# (lock.ROOM, readings.UNBOUNDED / PROBABILITY / COSINE) are not mutated by mutmut, which mutates functions only:
# their uses are (out_of_room's callers, the limits handed to _bounds).
ROUND23 = (
    "qkhooks.store.writer.xǁRunWriterǁ_check_folder__*", "qkhooks.store.writer.xǁRunWriterǁ_publish__*",
    "qkhooks.store.writer.xǁRunWriterǁ_raise_if_failed__*", "qkhooks.store.writer.xǁRunWriterǁ_work__*",
    "qkhooks.store.writer.xǁRunWriterǁ_do_batch__*", "qkhooks.store.writer.xǁRunWriterǁ_check_space__*",
    "qkhooks.store.writer.xǁRunWriterǁ_create_per_image__*", "qkhooks.store.writer.xǁRunWriterǁ_layout_group__*",
    "qkhooks.store.writer.xǁRunWriterǁ_do_static__*",
    "qkhooks.store.lock.x_out_of_room__*", "qkhooks.store.lock.xǁWriterLockǁ__init____*",
    "qkhooks.store.format.xǁCommittedCountǁ*",
    "qkhooks.analysis.topk.xǁTopKModesǁ_merge_entrants__*",
    "qkhooks.readings.x__bootstrap_t__*", "qkhooks.readings.x_pair_pivots__*", "qkhooks.readings.x__pair_mean_se__*",
    "qkhooks.readings.x__limits__*", "qkhooks.readings.x__pivots__*", "qkhooks.readings.x__bounds__*",
    "qkhooks.readings.x_intervals__*", "qkhooks.readings.x_layer_intervals__*", "qkhooks.readings.x_trend_reading__*",
    "qkhooks.readings.x__difference__*", "qkhooks.readings.x_compare_reading__*",
    "qkhooks.analysis.anisotropy.x_baseline_pivots__*",
    "qkhooks.models.unsupported.x__where__*", "qkhooks.models.unsupported.x_refuse_opaque__*",
    "qkhooks.models.unsupported.x_refuse_compiled__*", "qkhooks.models.unsupported.x_refuse_altered_qk__*",
    "qkhooks.models.unsupported.x__after_own__*", "qkhooks.models.unsupported.x__reparametrization_fix__*",
    "qkhooks.models.unsupported.x_refuse_unplain_qk__*",
    "qkhooks.capture.xǁRecordingǁ_begin_batch__*",
)
# The round-24 code, for `--only` with the module "round25": every mutant whose mutated line round 24's commits wrote
# (and no later commit rewrote), in new functions and old alike (`commits:` patterns: :func:`written_by`, so no mutant
# numbers go stale), and `weights_fingerprint` whole (round 24's review rewrote it; its equivalents were renumbered).
ROUND24 = ("commits:30068a4..a5476db", "qkhooks.stream.x_weights_fingerprint__*")
# Round 25's code, for `--only` with the module "round26": every mutant whose mutated line round 25's commits wrote (and
# no later commit rewrote), by :func:`written_by`.
ROUND25 = ("commits:a5476db..aaff763",)
# Round 26's own code, for `--only` with the module "round26b": the lines round 26's commits wrote, by :func:`written_by`
# (main's head when the run began, `5580996`).
ROUND26 = ("commits:aaff763..5580996",)
# Round 27's code, for `--only` with the module "round27": the lines round 27's library commit wrote (`bb42916`: top-k's
# and the anisotropy reducer's stacked folds, the q/k path's unsliced weights), by :func:`written_by`.
ROUND27 = ("commits:86943fe..bb42916",)
# Round 27's later library commits, for `--only` with the module "round27b" (`bb42916..dcf6012`: verify's format line,
# the q/k hook's and the writer's fewer operations, the entry's cached compile verdict), by :func:`written_by`.
ROUND27B = ("commits:bb42916..dcf6012",)
# Round 28's library commits, for `--only` with the module "round28" (`f2eeb12..f1e0255`: round 27's review items
# mended), by :func:`written_by`.
ROUND28 = ("commits:f2eeb12..f1e0255",)
# The lead's writer commit of round 28, for `--only` with the module "round28b" (`32f78fc`: the packed hand-off).
ROUND28B = ("commits:25caf9a..32f78fc",)
# Round 29's library commits, for `--only` with the module "round29" (`e52c7d9..0c36b52`: the anisotropy baseline's
# centre rows taken in the layer's hook, keep_last, the statics-only resume fixed at open, the resume's message).
ROUND29 = ("commits:e52c7d9..0c36b52",)
# Round 30's library commits, for `--only` with the module "round30" (`369d0ec..abe37ed`: a joining layer's tokens handed
# to the sinks that take inputs, TakenParts, the BFD reducers' take_inputs and whole-batch folds).
ROUND30 = ("commits:369d0ec..abe37ed",)
# Round 30's later library commits, for `--only` with the module "round31" (`abe37ed..4a07a01`: run.last freed as the
# next forward begins, each layer's own geometry for live sinks, the hf: processor refusals, `qkhooks bfd`'s data flags).
ROUND31 = ("commits:abe37ed..4a07a01",)
# The library commits of rounds 31 and 32, for `--only` with the module "round32" (`4a07a01..fcb421f`: each layer's
# geometry read in its hook and its own prefix, GroupViT's segments, the refusals of windows and mixed batch axes, a
# failed forward's batch dropped, missing shards refused; the float16 overflow refusals, Reducer.images_held, same-object's
# chance per layer), by :func:`written_by`.
ROUND32 = ("commits:4a07a01..fcb421f",)
# Round 32's later library commits, for `--only` with the module "round33" (`fcb421f..ebe8fa2`: the review fixes of the
# capture and data paths, Recipe.reducers of a builtin, an HF composite config's attention map, the writer's overflow
# check by reducers.overflows and the resume's held-reducer check), by :func:`written_by`.
ROUND33 = ("commits:fcb421f..ebe8fa2",)
# Round 33's later library commits and round 34's fixes, for `--only` with the module "round34" (`ebe8fa2..b0ec42d`:
# masks read from the pixels each token shows, the review-33 fixes (call grids, RoPE tables, BlockMask, BFD's terms and
# null modes, checksummed statics, merged shards' run ids), timm's parallel blocks, round 34's review fixes (held files,
# nested eager recordings, readings' infinite samples, compute_dtype, float64 spectra, fx copies, BFD share claims)),
# by :func:`written_by`.
ROUND34 = ("commits:ebe8fa2..b0ec42d",)
# The library commits of rounds 35, 36 and 37, for `--only` with the module "round37" (`b0ec42d..9977ff1`: the per-image
# softmax core, review 35-37's fixes: per-batch q/k path checks, partial calls, BFD per-layer grids, record_dataset's
# shard and resume checks, held files, copy_statics, data items, conv_output_size), by :func:`written_by`.
ROUND37 = ("commits:b0ec42d..9977ff1",)
# Round 38's library commits, for `--only` with the module "round38" (`9977ff1..4f4469b`: the q/k call bracket, the
# module-level hooks, thread checks, the edited-spectrum check, the CLI's output and alpha checks), by :func:`written_by`.
ROUND38 = ("commits:9977ff1..4f4469b",)
# Round 39's library commits, for `--only` with the module "round39" (`4f4469b..a0291ba`: the spectrum copy at entry,
# file times and hashes, attribute digests, merge and repair checks, the CLI's early checks and SIGTERM, compare's
# repeated reports, BFD's constant features, the data readers' path ids and JSON refusals), by :func:`written_by`.
ROUND39 = ("commits:4f4469b..a0291ba",)
# Round 41's library commits, for `--only` with the module "round41" (`6ff989d..0a58ba1`: the larger --limit, the
# ImageFolder subset, the hub probe and review r41's fixes of it, the stamped reads' path naming, the limit's integer
# check), by :func:`written_by`.
ROUND41 = ("commits:6ff989d..0a58ba1",)
# Round 40's library commits, for `--only` with the module "round40" (`a0291ba..6ff989d`: file stamps taken where files
# are read, format 3, attribute digests of a user's own attributes, /images/skipped at each checkpoint, preference's
# refusals, record_dataset's unknown keyword, the text-model refusal, the ImageFolder by its files, RunReader.data,
# analyze_modes' split, merge's and bfd's messages), by :func:`written_by`.
ROUND40 = ("commits:a0291ba..6ff989d",)
# Round 42's own library commits, for `--only` with the module "round42" (from `09a2bd0`: torchvision's ViT, the lower
# limit of a stopped extension, the bend's inner extreme, the augmented cosine's words), by :func:`written_by`.
ROUND42 = ("commits:09a2bd0..648d39c",)
# Round 43's library code, for `--only` with the module "round43": the function that drops the stale heap references
# (rewritten after `c7d1fb2`), the lines `c7d1fb2` wrote in the resume (by :func:`written_by`), and the skipped
# list's added rows and readable rows.
ROUND43 = ("qkhooks.store.format.x_drop_stale_heap_references__*", "commits:2839703..c7d1fb2",
           "qkhooks.store.format.x_readable_skipped_rows__*", "qkhooks.store.writer.xǁRunWriterǁ_keep_readable_skipped__*",
           "qkhooks.store.writer.xǁRunWriterǁ_do_skipped__*")
# Round 44's run-file code, for `--only` with the module "round44": every line the round wrote in its files.
ROUND44 = ("commits:625ad37..91dc98b",)
# Round 45's library code, for `--only` with the module "round45": every line `84a8854..dbca73b` wrote (from the
# read-through `f9fc973` to `dbca73b`), by :func:`written_by`.
ROUND45 = ("commits:84a8854..dbca73b",)
# Round 46's library code, for `--only` with the module "round46": every line `dbca73b..2885a7a` wrote, by
# :func:`written_by`.
ROUND46 = ("commits:dbca73b..2885a7a",)
# Round 47's library code, for `--only` with the module "round47": every line `2885a7a..13f19ad` wrote, by
# :func:`written_by`.
ROUND47 = ("commits:2885a7a..13f19ad",)
# Round 48's library code, for `--only` with the module "round48": every line `368b4c5..edf303a` wrote, by
# :func:`written_by`.
ROUND48 = ("commits:368b4c5..edf303a",)
# Round 49's library code, for `--only` with the module "round49": every line `edf303a..81bab99` wrote, by
# :func:`written_by`.
ROUND49 = ("commits:edf303a..81bab99",)
# Round 50's library code, for `--only` with the module "round50": every line `81bab99..bebb0cb` wrote, by
# :func:`written_by`.
ROUND50 = ("commits:81bab99..bebb0cb",)
NAMED_SETS = {"ROUND18": ROUND18, "ROUND19": ROUND19, "ROUND20": ROUND20, "ROUND21": ROUND21, "ROUND22": ROUND22,
              "ROUND23": ROUND23, "ROUND24": ROUND24, "ROUND25": ROUND25,
              "ROUND26": ROUND26, "ROUND27": ROUND27, "ROUND27B": ROUND27B, "ROUND28": ROUND28,
              "ROUND28B": ROUND28B, "ROUND29": ROUND29, "ROUND30": ROUND30,
              "ROUND31": ROUND31, "ROUND32": ROUND32, "ROUND33": ROUND33,
              "ROUND34": ROUND34, "ROUND37": ROUND37, "ROUND38": ROUND38,
              "ROUND39": ROUND39, "ROUND40": ROUND40, "ROUND41": ROUND41,
              "ROUND42": ROUND42, "ROUND43": ROUND43, "ROUND44": ROUND44,
              "ROUND45": ROUND45, "ROUND46": ROUND46, "ROUND47": ROUND47,
              "ROUND48": ROUND48, "ROUND49": ROUND49, "ROUND50": ROUND50}
COMMITS = "commits:"
# Tests that run qkhooks in a fresh Python process: mutmut switches mutants only inside its own processes, so
# there they would test the unmutated code (or fail to import it). They still run in the ordinary suite.
# test_store_damaged_resume_and_retries.py's resumes of a "damaged killed run" stay in this process (the kill is simulated by the flags).
IN_A_SUBPROCESS = ("reachable_after_import or torchrun or (killed and not damaged_killed_run) or never_mistake "
                   "or clear_open_flags or sigterm or headless_chromium")
_COPIED = ("qkhooks", "tests", "setup.cfg", "setup.py")
# mutmut's time limit per mutant is (summed test call time + constant) x 15, in wall and (doubled) CPU seconds.
# The call time leaves out fixture setup (models, run files built once per module), so with mutmut's 1 s constant
# a mutant whose tests build a fixture ran out of time on a loaded machine: reducers' 68 "timeouts" of 21:28 were
# mostly such (e.g. `recipe()`'s default name, re-run: the tests pass). 10 s covers the fixtures.
TIMEOUT_CONSTANT_S = 10.0
# The fork server imports these and nothing else (mutmut's default, collecting the tests, runs torch ops that start
# OpenMP's thread team; a mutant forked from it then hung in gomp_team_barrier_wait_end at its first parallel op
# until its wall-clock limit, a "timeout" counted as a kill: reducers, round 10). No qkhooks module: the mutants
# must be imported in the worker, from mutants/.
PRELOADED = ("numpy", "torch", "h5py", "PIL.Image", "timm", "transformers", "pytest")
# -11: the tests' process died of a segfault (mutmut's 'segfault'; round 23: memcmp handed a null pointer), which
# the tests detect as surely as a failure: counted as killed.
_KILLED, _SURVIVED, _NO_TESTS, _TIMEOUTS, _SKIPPED = {1, 3, -11}, {0}, {5, 33}, {24, -24, 36, 152, 255}, {34}


def _sync(src: Path, dst: Path) -> None:
    """Mirror ``src`` into ``dst``, rewriting only files whose content changed (keeps mutmut's cache valid)."""
    if src.is_file():
        if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        return
    wanted = {p.name for p in src.iterdir() if p.name not in ("__pycache__", ".pytest_cache")}
    dst.mkdir(parents=True, exist_ok=True)
    for stale in (p for p in dst.iterdir() if p.name not in wanted and p.name != "__pycache__"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for name in wanted:
        _sync(src / name, dst / name)


def _configure(work: Path, files: list[str], tests: list[str], select: str | None) -> None:
    """The project's setup.cfg with ``[mutmut]`` narrowed to this module and its tests."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    if not cfg.has_section("mutmut"):
        cfg.add_section("mutmut")
    cfg.set("mutmut", "only_mutate", "\n" + "\n".join(files))
    expression = f"not ({IN_A_SUBPROCESS})" if select is None else f"({select}) and not ({IN_A_SUBPROCESS})"
    selection = [t for t in tests if (ROOT / t).exists()] + ["-k", expression]
    cfg.set("mutmut", "pytest_add_cli_args_test_selection", "\n" + "\n".join(selection))
    cfg.set("mutmut", "timeout_constant", str(TIMEOUT_CONSTANT_S))
    preload = work / "preload_modules.txt"
    preload.write_text("\n".join(PRELOADED) + "\n")
    cfg.set("mutmut", "forkserver_warmup", "import")
    cfg.set("mutmut", "preload_modules_file", str(preload.resolve()))
    with open(work / "setup.cfg", "w") as f:
        cfg.write(f)


def equivalent_mutants() -> dict[str, str]:
    """Mutant name -> the one-line reason it is equivalent (``tests/mutation_equivalent.txt``)."""
    out: dict[str, str] = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, reason = line.partition(" ")
                out[name] = reason.strip()
    return out


def _verdicts(work: Path) -> dict[str, int | None]:
    """Mutant name -> mutmut's exit code for it (None: not run yet)."""
    codes: dict[str, int | None] = {}
    for meta in (work / "mutants").rglob("*.meta"):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def score(work: Path, only: list[str] | None = None) -> dict[str, object]:
    """Counts of one module's mutants by verdict (or of the sample ``only``), and the score with equivalent mutants
    excluded."""
    codes = _verdicts(work)
    if only is not None:
        codes = {name: code for name, code in codes.items() if name in only}
    equivalent = equivalent_mutants()
    counted = {name: code for name, code in codes.items() if name not in equivalent}
    killed = sum(code in _KILLED or code in _TIMEOUTS for code in counted.values())
    survivors = sorted(name for name, code in counted.items() if code in _SURVIVED or code in _NO_TESTS)
    denominator = len(counted) - sum(code in _SKIPPED for code in counted.values())
    return {
        "mutants": len(codes),
        "equivalent": len(codes) - len(counted),
        "killed": killed,
        "survived": survivors,
        "not_run": sorted(name for name, code in counted.items() if code is None),
        "score": killed / denominator if denominator else float("nan"),
    }


def matching(names: list[str], patterns: tuple[str, ...], work: Path | None = None) -> list[str]:
    """The mutant names matching any of ``patterns`` (fnmatch, a name of :data:`NAMED_SETS`, or ``commits:A..B``:
    the mutants of ``work`` on lines those commits wrote, :func:`written_by`); all for none."""
    patterns = tuple(p for name in patterns for p in NAMED_SETS.get(name, (name,)))
    written = set().union(*(written_by(work, p[len(COMMITS):]) for p in patterns if p.startswith(COMMITS)))
    return sorted(n for n in names if not patterns or n in written
                  or any(fnmatch.fnmatchcase(n, p) for p in patterns if not p.startswith(COMMITS)))


def written_by(work: Path, revs: str, repo: Path = ROOT) -> set[str]:
    """The mutants of ``work`` (a module's copy, its mutants made) whose mutated line was written by the commits
    ``revs`` (``git rev-list`` syntax, ``A..B``) and is still as they wrote it (``git blame`` of this checkout): one
    round's code, in the functions it added and in the lines it changed in older ones, whatever numbers mutmut gives
    them. mutmut's ``.spans`` file places each mutant's copy of its function; the line where the copy differs from the
    unmutated copy (``__mutmut_orig``) is placed in the source by where that function's body lies there. ``repo``: the
    git checkout holding the source (this project's by default)."""
    commits = set(subprocess.run(["git", "rev-list", revs], cwd=repo, capture_output=True, text=True,
                                 check=True).stdout.split())
    found: set[str] = set()
    for spans_file in (work / "mutants").rglob("*.py.spans"):
        relative = spans_file.relative_to(work / "mutants").with_suffix("")
        blame = subprocess.run(["git", "blame", "--root", "-l", "-s", "--", str(relative)], cwd=repo, capture_output=True,
                               text=True, check=True).stdout.splitlines()
        theirs = {i for i, line in enumerate(blame) if line.split(maxsplit=1)[0].lstrip("^") in commits}
        if not theirs:
            continue
        source = [line.strip() for line in (repo / relative).read_text().splitlines()]
        copies = (work / "mutants" / relative).read_text().splitlines()
        spans = json.loads(spans_file.read_text())["spans"]
        module = ".".join(relative.with_suffix("").parts)
        for name, (first, last) in spans.items():
            function, _, number = name.rpartition("__mutmut_")
            if number == "orig":
                continue
            orig_first, orig_last = spans[f"{function}__mutmut_orig"]
            orig, mutant = copies[orig_first - 1:orig_last], copies[first - 1:last]
            body = next(i for i, line in enumerate(orig) if "__mutmut_orig" in line) + 1  # past the def's first line
            changed = next((i for i, (a, b) in enumerate(zip(orig, mutant))
                            if a.replace("__mutmut_orig", "") != b.replace(f"__mutmut_{number}", "")), None)
            start = _body_in(source, [line.strip() for line in orig[body:]])
            if changed is not None and start is not None and start + changed - body in theirs:
                found.add(f"{module}.{name}")
    return found


def _body_in(source: list[str], body: list[str]) -> int | None:
    """Where the lines ``body`` (stripped) start in ``source`` (stripped), or None."""
    for i in range(len(source) - len(body) + 1):
        if source[i:i + len(body)] == body:
            return i
    return None


def run(module: str, children: int, root: Path = WORK, sample: int = 0,
        only: tuple[str, ...] = ()) -> dict[str, object]:
    files, tests, select = MODULES[module]
    work = root / module
    for name in _COPIED:
        _sync(ROOT / name, work / name)
    _configure(work, files, tests, select)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # import the mutants, not this checkout
    mutmut = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children)]
    if sample or only:
        return _run_chosen(work, mutmut, env, sample, only)
    earlier = score(work)["survived"] if (work / "mutants").exists() else []
    subprocess.run(mutmut, cwd=work, env=env, check=False)  # new and changed functions' mutants
    if earlier:  # mutmut keeps a survivor's verdict; the tests may have changed since, so try them again
        subprocess.run(mutmut + list(earlier), cwd=work, env=env, check=False)
    return score(work)


def _run_chosen(work: Path, mutmut: list[str], env: dict[str, str], size: int,
                only: tuple[str, ...] = ()) -> dict[str, object]:
    """Run the module's mutants named by ``only`` (all for none), or ``size`` of those drawn at random (seed 0, so a
    rerun draws the same ones, and retries the sample's survivors against the current tests): a score with a known
    error where the whole module does not fit the time (a loaded machine runs 2-3 mutants a minute). The mutants
    run are written to ``sample.txt``."""
    if not _verdicts(work):  # mutmut makes the mutants (and its test stats) before it looks for the names asked
        subprocess.run(mutmut + ["no mutant has this name"], cwd=work, env=env, check=False)
    names = matching(sorted(_verdicts(work)), only, work)
    chosen = sorted(random.Random(0).sample(names, min(size, len(names)))) if size else names
    (work / "sample.txt").write_text("\n".join(chosen) + "\n")
    subprocess.run(mutmut + chosen, cwd=work, env=env, check=False)
    return score(work, only=chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(MODULES), help=f"any of {', '.join(MODULES)}")
    parser.add_argument("--children", type=int, default=2, help="mutants tested in parallel")
    parser.add_argument("--score-only", action="store_true", help="report the last run's verdicts, run nothing")
    parser.add_argument("--sample", type=int, default=0, help="run only this many of each module's mutants, drawn at "
                        "random (seed 0), and score those")
    parser.add_argument("--only", nargs="+", default=(), metavar="PATTERN", help="run and score only the mutants "
                        f"whose names match (fnmatch), a named set ({', '.join(NAMED_SETS)}), or {COMMITS}A..B (the "
                        "mutants on lines those commits wrote, by git blame)")
    parser.add_argument("--work", type=Path, default=WORK, help="where the per-module copies live (default: .mutation; "
                        "another folder keeps a second run apart from one under way)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    print(f"# mutation run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    for module in args.modules:
        drawn = args.work / module / "sample.txt"
        only = drawn.read_text().split() if (args.sample or args.only) and drawn.exists() else None
        result = (score(args.work / module, only) if args.score_only
                  else run(module, args.children, args.work, args.sample, tuple(args.only)))
        print(f"{module}: {result['killed']}/{result['mutants'] - result['equivalent']} killed "
              f"({100 * result['score']:.1f}%), {result['equivalent']} equivalent excluded")
        for name in result["survived"]:
            print(f"  survived: {name}")
        if result["not_run"]:
            print(f"  not run yet: {len(result['not_run'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
