"""Output folders under concurrent runs, kill -9 and --overwrite (docs/faults.md): an OS lock held for
the life of a run (train, merge, export, quantize), --overwrite only after every check and only of
what a run writes, never through a symlink, and bad --output paths as one-line errors."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.cli import main
from qlora.errors import QLoraError
from qlora.outdir import LOCK_NAME, OutputLock
from qlora.train import TrainConfig, train

from tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from qlora.outdir import OutputLock; OutputLock(sys.argv[1], 'x'); "
        "print('locked', flush=True); time.sleep(120)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("outdir")
    make_tiny_model(d / "model")
    rows = [{"instruction": f"what is the capital of {c} ?", "output": f"the answer is {c} ."}
            for c in ["paris", "rome", "berlin"] * 4]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def cfg(setup, out, **kw):
    base = dict(data=str(setup / "data.jsonl"), model=str(setup / "model"), output=str(out), rank=4, alpha=8,
                batch_size=4, grad_accum=1, max_steps=1, compute_dtype="fp32", progress=False, optim="adamw")
    return TrainConfig(**{**base, **kw})


def no_load(monkeypatch):
    import qlora.model
    monkeypatch.setattr(qlora.model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.fixture
def holder():
    """Start another process that takes the lock on a path and keeps it; yields (start, process list)."""
    procs = []

    def start(path):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert p.stdout.readline().strip() == "locked"
        procs.append(p)
        return p
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_second_run_fails_at_once_naming_the_holder_and_kill_9_leaves_no_stale_lock(setup, tmp_path, holder,
                                                                                     monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    other = holder(out / LOCK_NAME)  # as a first run into this folder holds it
    with monkeypatch.context() as m:
        no_load(m)  # "at once": before the model load
        with pytest.raises(QLoraError, match=rf"in use by another qlora process \(PID {other.pid} on host "
                                             rf"{socket.gethostname()}"):
            train(cfg(setup, out), log=lambda m: None)
    assert not (out / "config.yaml").exists()  # nothing of the second run written
    other.send_signal(signal.SIGKILL)  # the first run dies without cleaning up
    other.wait()
    assert (out / LOCK_NAME).exists()  # its lock file stays behind, but the OS dropped the lock
    s = train(cfg(setup, out), log=lambda m: None)
    assert s["steps"] == 1 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()  # a finished run removes its lock file


def test_the_lock_is_held_for_the_life_of_the_run(setup, tmp_path):
    """While the run trains (its log line about the model comes after the load), another process cannot
    take the folder's lock; after the run it can."""
    out, seen = tmp_path / "o", []

    def log(msg):
        if msg.startswith("model:"):
            r = subprocess.run([sys.executable, "-c", "import sys; from qlora.outdir import OutputLock; "
                                "OutputLock(sys.argv[1], 'the folder')", str(out / LOCK_NAME)],
                               capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            seen.append(r)
    train(cfg(setup, out), log=log)
    assert len(seen) == 1 and seen[0].returncode != 0
    assert f"PID {os.getpid()} on host {socket.gethostname()}" in seen[0].stderr
    with OutputLock(out / LOCK_NAME, "after"):
        pass


def test_lock_is_released_when_a_run_fails(setup, tmp_path, monkeypatch):
    import qlora.model
    out = tmp_path / "o"
    monkeypatch.setattr(qlora.model, "load_model", lambda *a, **k: (_ for _ in ()).throw(QLoraError("bad model")))
    with pytest.raises(QLoraError, match="bad model"):
        train(cfg(setup, out), log=lambda m: None)
    assert list(out.iterdir()) == []  # no lock file, no config.yaml: nothing of a run that never started
    with OutputLock(out / LOCK_NAME, "after"):
        pass


@pytest.mark.parametrize("command", ["merge", "export", "quantize"])
def test_merge_export_quantize_outputs_are_locked(setup, tmp_path, holder, monkeypatch, capsys, command):
    import qlora.sources
    monkeypatch.setattr(qlora.sources, "open_source", lambda *a, **k: pytest.fail("the model was opened"))
    out = tmp_path / ("m.gguf" if command == "export" else "m")
    holder(out.with_name(out.name + ".lock"))
    argv = {"merge": ["merge", "--model", str(setup / "model"), "--adapter", "", "--output", str(out)],
            "export": ["export", "--model", str(setup / "model"), "--output", str(out)],
            "quantize": ["quantize", str(setup / "model"), str(out)]}[command]
    assert main(argv) == 2
    assert "is in use by another qlora process" in capsys.readouterr().err
    assert not out.exists()


def test_merge_output_lock_message(setup, tmp_path, holder):
    from qlora.adapters import merge
    out = tmp_path / "merged"
    other = holder(tmp_path / "merged.lock")
    with pytest.raises(QLoraError, match=rf"merge output .*merged is in use .*PID {other.pid}"):
        merge(str(setup / "model"), None, out)


def test_overwrite_deletes_nothing_when_a_later_check_fails(setup, tmp_path, monkeypatch):
    """Issue 32, case 2: --overwrite on a folder of the user's files, with a model then refused (a pickle-only
    folder): every file is still there, the previous run's too."""
    out = tmp_path / "o"
    train(cfg(setup, out), log=lambda m: None)
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.txt").write_text("mine too")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((setup / "model" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(QLoraError, match="pickle"):
        train(cfg(setup, out, model=str(pickled), overwrite=True), log=lambda m: None)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_overwrite_removes_only_what_a_run_writes_and_never_follows_symlinks(setup, tmp_path):
    out, elsewhere = tmp_path / "o", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep")
    train(cfg(setup, out), log=lambda m: None)
    old_adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    (out / "notes.txt").write_text("mine")
    (out / "link").symlink_to(elsewhere, target_is_directory=True)
    (out / "checkpoints" / "link-inside").symlink_to(elsewhere, target_is_directory=True)
    train(cfg(setup, out, seed=7, overwrite=True), log=lambda m: None)
    assert (out / "notes.txt").read_text() == "mine" and (out / "link").is_symlink()
    assert (elsewhere / "precious.txt").read_text() == "keep"  # rmtree of checkpoints/ unlinked the link only
    assert not (out / "checkpoints" / "link-inside").exists()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter  # the new run's
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]  # one run's metrics, not two runs' mixed
    assert [r["kind"] for r in rows if "warning" in r] == ["few_steps"]  # (that run's one fit warning)


def test_symlink_where_a_run_writes_is_refused(setup, tmp_path, monkeypatch):
    out, elsewhere = tmp_path / "o", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep")
    out.mkdir()
    (out / "adapter").symlink_to(elsewhere, target_is_directory=True)
    no_load(monkeypatch)
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(QLoraError, match=r"adapter is a symbolic link"):
            train(cfg(setup, out, **kw), log=lambda m: None)
    assert (elsewhere / "precious.txt").read_text() == "keep" and (out / "adapter").is_symlink()


def test_folder_of_other_files_needs_overwrite_and_keeps_them(setup, tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with monkeypatch.context() as m:
        no_load(m)
        with pytest.raises(QLoraError, match=r"not empty and holds no qlora run \(notes.txt\)"):
            train(cfg(setup, out), log=lambda m: None)
    train(cfg(setup, out, overwrite=True), log=lambda m: None)
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter").is_dir()


def test_bad_output_paths_are_one_line_errors(setup, tmp_path, monkeypatch, capsys):
    no_load(monkeypatch)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "missing")
    afile = tmp_path / "afile"
    afile.write_text("x")
    common = ["train", "--data", str(setup / "data.jsonl"), "--model", str(setup / "model"), "--output"]
    assert main(common + [str(dangling)]) == 2
    assert "symbolic link to" in capsys.readouterr().err
    assert main(common + [str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(QLoraError, match="--output DIR is required"):
        train(cfg(setup, tmp_path, output=None), log=lambda m: None)


def test_yaml_output_that_is_not_a_string(setup, tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text(f"data: {setup / 'data.jsonl'}\noutput: 123\n")
    assert main(["train", "--config", str(y)]) == 2
    err = capsys.readouterr().err
    assert f"{y}: option output: expected str, got 123" in err and "internal error" not in err
