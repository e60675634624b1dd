"""The results store: round trip, resume, refusal, locking, crash consistency, bad files."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pandas as pd
import pytest

from ntk_tickets.errors import UserInputError
from ntk_tickets.results import (
    FORMAT_VERSION,
    RECORD_COLUMNS,
    ResultsStore,
    _atomic_write_bytes,
    _parquet_bytes,
    environment_info,
    load_manifest,
    load_masks,
    load_records,
    mask_arrays,
    open_store,
    records_frame,
)

CONFIG = {"name": "t", "model": {"widths": [4, 8], "depth": 1}, "train": {"seeds": [0]}}
OTHER = {"name": "t", "model": {"widths": [4, 8], "depth": 3}, "train": {"seeds": [0]}}
FINGERPRINT = "0123456789abcdef"


def _rows(width, seed=0, steps=(0, 10), eps=None):
    rows = []
    for step in steps:
        for split in ("train", "test"):
            row = {"width": width, "seed": seed, "path": "exact", "step": step, "split": split,
                   "metric": "loss", "value": 1.0 / (1 + step + width)}
            if eps is not None:
                row.update(mask="perturb", eps=eps, sparsity=0.5, round=2)
            rows.append(row)
    return rows


def _store(path, config=CONFIG, **kwargs):
    return ResultsStore(path, config, FINGERPRINT, x64=False, **kwargs)


def _write_two(path):
    with _store(path) as store:
        store.write_cell("width=8", records_frame(_rows(8)), "done", compile_s=1.5, run_s=2.5)
        store.write_cell("width=4", _rows(4, eps=0.1), "diverged", compile_s=0.5, run_s=0.25,
                         diverged_step=np.int64(17), last_loss=float("nan"),
                         sparsity_report={"Dense_0": np.float32(0.5)})


def test_records_frame_fills_defaults_and_enforces_dtypes():
    frame = records_frame(_rows(4, steps=(3,)))
    assert tuple(frame.columns) == RECORD_COLUMNS
    assert frame["mask"].tolist() == ["dense", "dense"]
    assert (frame["sparsity"] == 0.0).all() and (frame["round"] == 0).all()
    assert frame["eps"].isna().all()
    assert str(frame["width"].dtype) == "int64" and str(frame["step"].dtype) == "int64"
    assert str(frame["value"].dtype) == "float64" and str(frame["eps"].dtype) == "float64"
    assert pd.api.types.is_string_dtype(frame["path"])
    row = {"width": np.int64(4), "seed": jax.numpy.array(1), "path": "ntk", "step": 0,
           "metric": "loss", "value": jax.numpy.float32(0.5)}
    assert records_frame([row])["seed"].tolist() == [1]
    assert records_frame([{**row, "split": "none"}])["split"].tolist() == ["none"]
    empty = records_frame([])
    assert len(empty) == 0 and (empty.dtypes == frame.dtypes).all()


@pytest.mark.parametrize("change, fragment", [
    ({"step": "DROP"}, "lacks required column(s) ['step']"),
    ({"bogus": 1}, "unknown column(s) ['bogus']"),
    ({"step": 1.5}, "column 'step' must be int"),
    ({"path": None}, "column 'path' must be str"),
])
def test_records_frame_rejects_bad_rows(change, fragment):
    row = {"width": 4, "seed": 0, "path": "exact", "step": 0, "metric": "loss", "value": 1.0}
    row = {k: v for k, v in {**row, **change}.items() if v != "DROP"}
    with pytest.raises(ValueError, match=re.escape(f"record 1: {fragment}")
                       if "column '" in fragment else re.escape(fragment)):
        records_frame([_rows(4)[0], row])


def test_round_trip_two_cells(tmp_path):
    _write_two(tmp_path / "a" / "b")  # parents are created
    records = load_records(tmp_path / "a" / "b")
    expected = pd.concat([records_frame(_rows(4, eps=0.1)), records_frame(_rows(8))],
                         ignore_index=True)  # sorted cell-id order: width=4, width=8
    pd.testing.assert_frame_equal(records, expected)
    assert tuple(records.columns) == RECORD_COLUMNS
    assert (records.dtypes == records_frame([]).dtypes).all()
    assert records.loc[records["width"] == 4, "eps"].eq(0.1).all()

    manifest = load_manifest(tmp_path / "a" / "b")
    assert manifest["config"] == CONFIG and manifest["format_version"] == FORMAT_VERSION
    assert manifest["identity"] == {"model": {"depth": 1}, "train": {}}
    assert manifest["data_fingerprint"] == FINGERPRINT
    assert manifest["created"] and manifest["updated"]
    for env in (manifest["environment"], manifest["cells"]["width=8"]["environment"]):
        assert env["jax"] == jax.__version__ and env["neural-tangents"] == "0.6.5"
        assert env["x64"] is False and env["device"] == str(jax.devices()[0])
        assert {"python", "jaxlib", "optax", "numpy", "ntk_tickets", "git_sha",
                "host"} <= set(env)
    done, diverged = manifest["cells"]["width=8"], manifest["cells"]["width=4"]
    assert (done["status"], done["compile_s"], done["run_s"], done["rows"]) == (
        "done", 1.5, 2.5, 4)
    assert diverged["status"] == "diverged" and diverged["diverged_step"] == 17
    assert diverged["last_loss"] == "nan" and diverged["sparsity_report"] == {"Dense_0": 0.5}
    json.loads((tmp_path / "a" / "b" / "manifest.json").read_text())  # strict JSON
    assert not list((tmp_path / "a" / "b").rglob("*.tmp"))


def test_resume_keeps_finished_cells_and_duplicates_nothing(tmp_path):
    _write_two(tmp_path)
    created = load_manifest(tmp_path)["created"]
    with _store(tmp_path) as store:
        assert store.done_cells() == {"width=4", "width=8"}
        store.write_cell("width=16", _rows(16), "done", compile_s=0.1, run_s=0.2)
        store.write_cell("width=8", _rows(8), "done", compile_s=0.1, run_s=0.2)  # replaces
    records = load_records(tmp_path)
    assert len(records) == 12 and not records.duplicated().any()
    assert sorted(records["width"].unique()) == [4, 8, 16]
    manifest = load_manifest(tmp_path)
    assert manifest["created"] == created
    assert manifest["cells"]["width=4"]["environment"]["x64"] is False  # kept as it was


def test_more_widths_seeds_or_another_name_is_the_same_study(tmp_path):
    _write_two(tmp_path)
    grown = {"name": "renamed", "model": {"widths": [4, 8, 16], "depth": 1},
             "train": {"seeds": [0, 1, 2]}}
    with _store(tmp_path, grown) as store:
        assert store.done_cells() == {"width=4", "width=8"}
    assert load_manifest(tmp_path)["config"] == grown


@pytest.mark.parametrize("kwargs, fragment", [
    ({"config": OTHER}, "another study: model.depth differs"),
    ({"data_fingerprint": "ffff"}, "other data"),
    ({"x64": True}, "x64 = False"),
])
def test_a_different_study_is_refused(tmp_path, kwargs, fragment):
    _write_two(tmp_path)
    args = {"config": CONFIG, "data_fingerprint": FINGERPRINT, "x64": False, **kwargs}
    with pytest.raises(UserInputError) as e:
        open_store(tmp_path, **args)
    assert fragment in str(e.value) and str(tmp_path) in str(e.value)
    assert "--out" in str(e.value) and "--force" in str(e.value)
    assert len(load_records(tmp_path)) == 8  # untouched
    open_store(tmp_path, CONFIG, FINGERPRINT, False).close()  # and not locked


def test_force_starts_fresh(tmp_path):
    _write_two(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "cells" / "notes.txt").write_text("mine too")
    (tmp_path / "cells" / "other.parquet").write_bytes(b"not ours")
    with _store(tmp_path, OTHER, force=True) as store:
        assert store.done_cells() == set()
        assert store.manifest["identity"]["model"] == {"depth": 3}
    assert not (tmp_path / "records.parquet").exists()
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["notes.txt",
                                                                        "other.parquet"]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # nothing else is touched
    with pytest.raises(UserInputError, match="no cell of this study has finished yet"):
        load_records(tmp_path)


def test_a_second_writer_is_refused_until_the_first_closes(tmp_path):
    first = _store(tmp_path)
    with pytest.raises(UserInputError) as e:
        _store(tmp_path)
    assert "another ntk-tickets run is writing" in str(e.value)
    assert f"(pid {os.getpid()})" in str(e.value) and str(tmp_path) in str(e.value)
    first.write_cell("width=4", _rows(4), "done")
    assert len(load_records(tmp_path)) == 4  # readers need no lock
    first.close()
    with _store(tmp_path) as second:
        assert second.done_cells() == {"width=4"}
    with pytest.raises(RuntimeError, match="closed"):
        first.write_cell("width=8", _rows(8), "done")


def test_a_killed_writer_blocks_while_alive_and_not_after_sigkill(tmp_path):
    child = textwrap.dedent(f"""
        import os, signal, sys
        from ntk_tickets.results import ResultsStore
        store = ResultsStore({str(tmp_path)!r}, {CONFIG!r}, {FINGERPRINT!r}, False)
        print("pandas" in sys.modules, flush=True)
        sys.stdin.readline()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        # Opening a store imports nothing heavy at module import: pandas only on demand.
        assert proc.stdout.readline().strip() == "False"
        with pytest.raises(UserInputError, match=f"pid {proc.pid}"):
            _store(tmp_path)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / ".lock").read_text().strip() == str(proc.pid)  # left behind
    with _store(tmp_path) as store:
        store.write_cell("width=4", _rows(4), "done")
    assert len(load_records(tmp_path)) == 4


def _claim(folder, cell_id, intended="done", **entry):
    """What write_cell leaves after claiming a cell, before its last manifest write."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["cells"][cell_id] = {**entry, "status": "pending", "intended": intended}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_reopening_reconciles_what_a_crash_left(tmp_path):
    _write_two(tmp_path)
    full = load_records(tmp_path)
    # A crash after the cell file was written, before records.parquet and the manifest:
    _claim(tmp_path, "width=2", "diverged", width=2, seeds=[0], diverged_step={"exact": 3})
    _atomic_write_bytes(tmp_path / "cells" / "width=2.parquet", _parquet_bytes(
        records_frame(_rows(2))))
    # ... and one mid-write of a claimed cell's file:
    _claim(tmp_path, "width=1")
    (tmp_path / "cells" / ".width=1.parquet.0badc0de.tmp").write_bytes(b"half")
    with _store(tmp_path) as store:
        assert store.done_cells() == {"width=2", "width=4", "width=8"}
        entry = store.manifest["cells"]["width=2"]
        assert entry["status"] == "diverged" and entry["rows"] == 4  # as it was written
        assert entry["width"] == 2 and entry["seeds"] == [0] and "intended" not in entry
        assert entry["diverged_step"] == {"exact": 3}
        assert "width=1" not in store.manifest["cells"]
    assert len(load_records(tmp_path)) == 12
    assert not list(tmp_path.rglob("*.tmp"))
    # records.parquet lost, and a finished cell's file deleted by hand:
    (tmp_path / "records.parquet").unlink()
    (tmp_path / "cells" / "width=2.parquet").unlink()
    with _store(tmp_path) as store:
        assert store.done_cells() == {"width=4", "width=8"}  # width=2 will be recomputed
    pd.testing.assert_frame_equal(load_records(tmp_path), full)


def test_a_failed_cell_keeps_no_records_and_is_run_again(tmp_path):
    with _store(tmp_path) as store:
        store.write_cell("width=4", None, "failed", compile_s=0.1, run_s=None, error="OOM")
        assert store.done_cells() == set()
        assert store.manifest["cells"]["width=4"]["error"] == "OOM"
        assert not (tmp_path / "records.parquet").exists()
        store.write_cell("width=4", _rows(4), "done")
    assert load_manifest(tmp_path)["cells"]["width=4"]["status"] == "done"
    with _store(tmp_path) as store, pytest.raises(ValueError, match="status"):
        store.write_cell("width=8", _rows(8), "finished")


def test_corrupted_files_are_named(tmp_path):
    _write_two(tmp_path)
    records = tmp_path / "records.parquet"
    records.write_bytes(b"not parquet at all")
    with pytest.raises(UserInputError, match="records.parquet' is corrupted or not an "
                                             "ntk-tickets records file"):
        load_records(tmp_path)
    _store(tmp_path).close()  # the writer rebuilds it from the cells
    assert len(load_records(tmp_path)) == 8
    records.write_bytes(_parquet_bytes(pd.DataFrame({"width": [1]})))
    with pytest.raises(UserInputError, match="corrupted or not an ntk-tickets records file"):
        load_records(tmp_path)

    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserInputError, match="manifest.json' is corrupted"):
        load_manifest(tmp_path)
    for force in (False, True):  # nothing proves the other files are ours: never replaced
        with pytest.raises(UserInputError, match="move it away"):
            _store(tmp_path, force=force)
    assert (tmp_path / "manifest.json").read_text() == "{not json"
    assert len(list((tmp_path / "cells").iterdir())) == 2


def test_a_records_file_without_a_manifest_is_never_replaced(tmp_path):
    (tmp_path / "records.parquet").write_bytes(b"someone else's table")
    with pytest.raises(UserInputError, match="is not empty"):
        _store(tmp_path)
    with pytest.raises(UserInputError, match="no manifest.json accounts for it"):
        _store(tmp_path, force=True)
    assert (tmp_path / "records.parquet").read_bytes() == b"someone else's table"


def test_force_stopped_midway_leaves_a_folder_the_next_run_accepts(tmp_path, monkeypatch):
    _write_two(tmp_path)
    calls = []

    def stop_after_first_delete(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = type(tmp_path).unlink
    monkeypatch.setattr(type(tmp_path), "unlink", stop_after_first_delete)
    with pytest.raises(KeyboardInterrupt):
        _store(tmp_path, OTHER, force=True)
    monkeypatch.undo()
    with _store(tmp_path) as store:  # the old manifest is still there: its lost cells drop
        assert len(store.done_cells()) == 1  # one cell file was deleted, one was not


def test_missing_results_say_to_run_first(tmp_path):
    for load in (load_records, load_manifest):
        with pytest.raises(UserInputError, match="does not exist: run `ntk-tickets run"):
            load(tmp_path / "nowhere")
        with pytest.raises(UserInputError, match="does not exist: run `ntk-tickets run"):
            load(tmp_path)


def test_an_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserInputError, match="cannot create results folder .*file/out"):
        _store(blocker / "out")
    with pytest.raises(UserInputError, match="is a file, not a folder"):
        _store(blocker)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserInputError, match="cannot write in results folder"):
            _store(locked)


def test_a_cell_file_without_records_columns_is_named(tmp_path):
    _write_two(tmp_path)
    (tmp_path / "cells" / "width=4.parquet").write_bytes(_parquet_bytes(pd.DataFrame({"a": [1]})))
    (tmp_path / "records.parquet").unlink()
    with pytest.raises(UserInputError, match="cell file .*width=4.parquet' is corrupted"):
        _store(tmp_path)


def test_a_folder_with_cells_but_no_manifest_is_refused(tmp_path):
    _write_two(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(UserInputError, match="is not empty .* holds no ntk-tickets study.*"
                                             "--force"):
        _store(tmp_path)


def test_files_the_store_did_not_write_are_never_deleted(tmp_path):
    # The hostile-user repro: a folder with a cells/ note and a draft, no manifest.
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "notes.txt").write_text("x")
    (tmp_path / ".draft.tmp").write_text("k")
    (tmp_path / "cells" / ".draft.parquet.0badc0de.tmp").write_text("k")  # our pattern, not
    with pytest.raises(UserInputError, match=re.escape(f"{str(tmp_path)!r} is not empty")):
        _store(tmp_path)
    assert not (tmp_path / ".lock").exists()
    for force in (True, False):  # --force writes the study beside them; resuming too
        with _store(tmp_path, force=force) as store:
            store.write_cell("width=4", _rows(4), "done")
        assert (tmp_path / "cells" / "notes.txt").read_text() == "x"
        assert (tmp_path / ".draft.tmp").read_text() == "k"
        assert (tmp_path / "cells" / ".draft.parquet.0badc0de.tmp").exists()
    # A cell file the manifest does not name is not ours: left alone and not read.
    (tmp_path / "cells" / "width=9.parquet").write_bytes(_parquet_bytes(
        records_frame(_rows(9))))
    with _store(tmp_path, force=True):
        pass
    assert (tmp_path / "cells" / "width=9.parquet").exists()
    assert not (tmp_path / "records.parquet").exists()


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m.update(cells={"width=4": "done"}), "cell 'width=4' must be an object"),
    (lambda m: m.update(cells=[]), "'cells' must be a JSON dict"),
    (lambda m: m.update(identity_hash=3), "'identity_hash' must be a JSON str"),
    (lambda m: m.update(format_version=1), "results format 1"),
    (lambda m: m["cells"].update({"../x": {"status": "done"}}), "cell id '../x'"),
])
def test_a_hand_edited_manifest_is_named(tmp_path, edit, fragment):
    _write_two(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for load in (load_manifest, _store):
        with pytest.raises(UserInputError, match=re.escape(fragment)):
            load(tmp_path)


def test_masks_round_trip_as_pytrees(tmp_path):
    tree = [(), (np.array([[1, 0], [0, 1]]), np.array([1, 1])), [np.zeros(3)]]
    stacked = jax.tree_util.tree_map(lambda a: np.stack([a, 1 - a]), tree)
    arrays = mask_arrays({("imp", 1): stacked, ("random", 1): stacked}, seeds=[3, 5])
    with _store(tmp_path) as store:
        store.write_cell("width=4", _rows(4), "done", arrays=arrays, width=4, seeds=[3, 5])
    for seed, expected in ((3, tree), (5, jax.tree_util.tree_map(lambda a: 1 - a, tree))):
        got = load_masks(tmp_path, 4, "imp", 1, seed)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected),
                        strict=True):
            np.testing.assert_array_equal(a, b.astype(bool))
    with pytest.raises(UserInputError, match=r"no mask 'imp' round 2 .*\('imp', '1'\)"):
        load_masks(tmp_path, 4, "imp", 2, 3)
    with pytest.raises(UserInputError, match="no finished cell of width 8"):
        load_masks(tmp_path, 8, "imp", 1, 3)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    _atomic_write_bytes(target, b"old")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        _atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


def test_a_write_error_is_a_user_error_naming_the_folder(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device", str(tmp_path / "cells" / "x"))

    with _store(tmp_path) as store:
        monkeypatch.setattr(os, "replace", disk_full)
        with pytest.raises(UserInputError, match="No space left on device"):
            store.write_cell("width=4", _rows(4), "done")


def test_bad_cell_ids_and_info_are_refused(tmp_path):
    with _store(tmp_path) as store:
        for bad in ("../x", ".hidden", "a/b", ""):
            with pytest.raises(ValueError, match="cell id"):
                store.write_cell(bad, _rows(4), "done")
        with pytest.raises(ValueError, match="cannot be stored as JSON"):
            store.write_cell("w", _rows(4), "done", thing=object())
        with pytest.raises(ValueError, match="reserved"):
            store.write_cell("w", _rows(4), "done", rows=3)
        assert store.done_cells() == set()


def test_environment_info_never_raises(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    env = environment_info(True)
    assert env["git_sha"] is None and env["x64"] is True
    assert env["numpy"] == np.__version__


def test_a_folder_holding_only_derived_figures_is_a_study_to_redo(tmp_path):
    # A checkout keeps the figures of a study whose records are not committed.
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "loss_test.png").write_bytes(b"png")
    (tmp_path / "summary.csv").write_text("metric\n")
    with _store(tmp_path) as store:
        store.write_cell("width=4", _rows(4), "done")
    assert (tmp_path / "figures" / "loss_test.png").read_bytes() == b"png"


def test_rewriting_a_cell_without_arrays_drops_its_old_masks(tmp_path):
    tree = [(np.ones((2, 2)), np.ones(2))]
    arrays = mask_arrays({("imp", 1): jax.tree_util.tree_map(lambda a: a[None], tree)}, [0])
    with _store(tmp_path) as store:
        store.write_cell("width=4", _rows(4), "done", arrays=arrays, width=4, seeds=[0])
        assert (tmp_path / "arrays" / "width=4.npz").exists()
        store.write_cell("width=4", _rows(4), "done", width=4, seeds=[0])
    assert not (tmp_path / "arrays" / "width=4.npz").exists()
    with pytest.raises(UserInputError, match="keeps no masks"):
        load_masks(tmp_path, 4, "imp", 1, 0)


def test_a_study_written_before_a_field_existed_still_grows():
    from ntk_tickets.config import (
        StudyConfig,
        config_to_dict,
        identity_differences,
        study_identity,
    )

    new = study_identity(config_to_dict(StudyConfig()))
    old = json.loads(json.dumps(new))
    del old["data"]["std_floor"]  # a field a later version added, at its default
    assert identity_differences(old, new) == []
    changed = json.loads(json.dumps(new))
    changed["data"]["std_floor"] = 0.5
    assert identity_differences(old, changed) == ["data.std_floor"]
