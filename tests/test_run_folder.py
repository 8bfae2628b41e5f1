"""The run folder's pieces, in-process: checkpoints the program owns (complete or skipped, kept
by count, never a user's folder), a save that fails leaving nothing behind, the one-writer lock,
the metrics file and what a resume may change. End to end through train.py: test_train.py."""

import errno
import json
import os
import shutil

import jax
import pytest

import sympow
from sympow import checkpoint, run_folder

TINY = dict(vocab_size=300, d_model=16, n_layers=1, n_heads=2, chunk_size=8)


@pytest.fixture(scope="module")
def model():
    return sympow.Transformer(sympow.ModelConfig(**TINY), key=jax.random.key(0))


def save(out, step, model, **retention):
    return checkpoint.save(out, step, model, None, 8 * step, dict(context=32), **retention)


def tree_bytes(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_user_folders_in_the_run_folder_survive_any_number_of_saves(tmp_path, model):
    first = save(tmp_path, 10, model)
    copies = {}
    for name in ("step_best", "step_0000010.bak", "step_0000010 (copy)", "notes"):
        shutil.copytree(first, tmp_path / name)
        copies[name] = tree_bytes(tmp_path / name)
    for step in range(11, 20):
        save(tmp_path, step, model)
        assert checkpoint.latest(tmp_path) == checkpoint.folder(tmp_path, step)
    for name, contents in copies.items():
        assert tree_bytes(tmp_path / name) == contents, name
    assert [path.name for _, path in checkpoint.program_checkpoints(tmp_path)] == ["step_0000018", "step_0000019"]


def test_the_last_k_are_kept_and_every_nth_forever(tmp_path, model):
    for step in range(1, 13):
        save(tmp_path, step, model, keep=3, keep_every=5)
    assert [step for step, _ in checkpoint.program_checkpoints(tmp_path)] == [5, 10, 11, 12]
    save(tmp_path, 10_000_000, model, keep=3, keep_every=5)  # an eighth digit sorts by number, not by name
    assert [step for step, _ in checkpoint.program_checkpoints(tmp_path)] == [5, 10, 11, 12, 10_000_000]
    save(tmp_path, 10_000_001, model, keep=3, keep_every=5)
    assert [step for step, _ in checkpoint.program_checkpoints(tmp_path)] == [5, 10, 12, 10_000_000, 10_000_001]


def damage(path, how):
    state = path / "state.eqx"
    if how == "truncated":
        state.write_bytes(state.read_bytes()[:1000])
    elif how == "a byte flipped":  # the same size: only the checksum can tell
        contents = bytearray(state.read_bytes())
        contents[len(contents) // 2] ^= 0xFF
        state.write_bytes(bytes(contents))
    elif how == "a file missing":
        (path / "meta.json").unlink()
    elif how == "emptied":
        for file in path.iterdir():
            file.unlink()
    elif how == "a damaged manifest":
        (path / checkpoint.MANIFEST).write_text("{ not json")


@pytest.mark.parametrize("how", ["truncated", "a byte flipped", "a file missing", "emptied", "a damaged manifest"])
def test_a_damaged_or_incomplete_newest_checkpoint_is_skipped_with_a_warning(tmp_path, model, how):
    save(tmp_path, 1, model)
    newest = save(tmp_path, 2, model)
    damage(newest, how)
    warnings = []
    assert checkpoint.latest(tmp_path, warn=warnings.append) == checkpoint.folder(tmp_path, 1)
    assert len(warnings) == 1 and str(newest) in warnings[0], warnings
    with pytest.raises(checkpoint.DamagedCheckpoint, match="damaged|incomplete"):
        checkpoint.verify(newest)
    loaded, meta = checkpoint.load_model(tmp_path)  # a run folder: the newest complete one
    assert meta["step"] == 1
    with pytest.raises((checkpoint.DamagedCheckpoint, FileNotFoundError)):  # named, it is refused
        checkpoint.load_model(newest)


def test_a_checkpoint_that_fits_another_model_is_refused_as_such(tmp_path, model):
    path = save(tmp_path, 1, model)
    other = sympow.Transformer(sympow.ModelConfig(**TINY | dict(d_model=32)), key=jax.random.key(0))
    with pytest.raises(checkpoint.DamagedCheckpoint, match="cannot be read as this model"):
        checkpoint.restore(path, other)


def test_a_checkpoint_written_before_manifests_still_loads(tmp_path, model):
    path = save(tmp_path, 3, model)
    (path / checkpoint.MANIFEST).unlink()  # the old saver's folders held state.eqx and meta.json only
    assert checkpoint.latest(tmp_path) == path
    assert checkpoint.load_model(tmp_path)[1]["step"] == 3


@pytest.mark.parametrize("failing", ["state.eqx", "meta.json"])
def test_a_save_that_fails_leaves_nothing_behind_and_the_previous_checkpoint_byte_for_byte(
    tmp_path, model, monkeypatch, failing
):
    previous = save(tmp_path, 1, model)
    before = tree_bytes(previous)
    real_write = checkpoint.write_file

    def disk_full_at(path, write):
        if path.name == failing:
            path.write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, write)

    monkeypatch.setattr(checkpoint, "write_file", disk_full_at)
    with pytest.raises(checkpoint.SaveFailed, match="No space left on device.*earlier checkpoints are as they were"):
        save(tmp_path, 2, model, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [previous.name]  # no partial, nothing dropped
    assert tree_bytes(previous) == before


def test_one_writer_per_run_folder_and_a_dead_holder_is_taken_over(tmp_path):
    first = run_folder.RunLock(tmp_path)
    with pytest.raises(run_folder.FolderInUse, match=f"in use by another run .*pid {os.getpid()}"):
        run_folder.RunLock(tmp_path)
    first.release()
    second = run_folder.RunLock(tmp_path)  # released: free, with nothing stale in it
    assert second.stale_holder == ""
    second.release()
    # A holder that died leaves its line in the file but no lock on it (the kernel drops that).
    (tmp_path / ".lock").write_text("host elsewhere, pid 999999, since yesterday")
    taken = run_folder.RunLock(tmp_path)
    assert taken.stale_holder == "host elsewhere, pid 999999, since yesterday"
    taken.release()


def test_metrics_are_cut_back_to_the_resumed_step_and_a_half_written_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(dict(step=s, loss=1.0 / s)) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in run_folder.read_metrics(path)] == [1, 2, 3, 4, 5]
    with run_folder.open_metrics(path, 3) as metrics:
        metrics.write(json.dumps(dict(step=4, loss=0.0)) + "\n")
    assert [(r["step"], r["loss"]) for r in run_folder.read_metrics(path)][-2:] == [(3, 1 / 3), (4, 0.0)]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2, is not JSON"):
        run_folder.read_metrics(path)


def test_a_resume_may_change_the_schedule_but_not_what_the_saved_state_means():
    saved = dict(context=256, tokens_per_update=4096, seed=0, data="embedded", lr=6e-4, steps=200, out="runs/a")
    now = saved | dict(context=1024, seed=1, lr=3e-4, steps=400, out="runs/b", keep=3)
    refused, changed = run_folder.resume_differences(saved, now)
    assert refused == ["--context: saved 256, now 1024", "--seed: saved 0, now 1"]
    grouped = run_folder.resume_differences(saved | dict(kv_heads=None), saved | dict(kv_heads=2))[0]
    assert grouped == ["--kv-heads: saved None, now 2"]  # the weights' shapes change
    assert changed == {"lr": [6e-4, 3e-4], "steps": [200, 400]}  # a moved folder, a new flag: no change
    assert run_folder.resume_differences(saved, dict(saved)) == ([], {})


def test_the_checksums_are_of_the_files_as_written(tmp_path, model):
    path = save(tmp_path, 1, model)
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())["files"]
    for name in checkpoint.FILES:
        assert manifest[name]["sha256"] == checkpoint.digest(path / name)
        assert manifest[name]["bytes"] == (path / name).stat().st_size
    assert checkpoint.load_model(path)[0].embedding.shape == (300, 16)


def test_a_checkpoint_from_before_grouped_heads_loads_with_one_key_value_head_per_head(tmp_path, model):
    """meta.json of a run saved before ModelConfig had n_kv_heads (and before manifests): the
    missing field means equal heads, and the weights load as they were."""
    path = save(tmp_path, 1, model)
    meta = json.loads((path / "meta.json").read_text())
    del meta["config"]["n_kv_heads"]
    (path / "meta.json").write_text(json.dumps(meta))
    (path / checkpoint.MANIFEST).unlink()
    loaded, _ = checkpoint.load_model(path)
    assert loaded.config == model.config and loaded.config.kv_heads == TINY["n_heads"]
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), loaded, model)))
