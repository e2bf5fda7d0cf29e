"""--report-to (qlora.trackers): TensorBoard events read back with TensorBoard's own EventAccumulator
equal metrics.jsonl; a tracker that is not installed or not known is one line before anything is written."""
import importlib.util
import json
import sys

import pytest

from qlora.errors import QLoraError
from qlora.train import train
from qlora.trackers import open_trackers

from helpers import cfg


def test_tensorboard_gets_the_metrics_rows(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "r"
    train(cfg(setup, out, report_to="tensorboard", max_steps=4, save_every=0, val_split=0.2, eval_every=2),
          log=lambda m: None)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ev.Reload()
    for name in ("loss", "lr", "grad_norm", "tokens", "eval_loss"):
        want = [(r["step"], r[name]) for r in rows if name in r]
        got = [(e.step, e.value) for e in ev.Scalars(name)]
        assert len(got) == len(want) > 0, name
        assert all(gs == ws and gv == pytest.approx(wv, rel=1e-6) for (gs, gv), (ws, wv) in zip(got, want)), name
    assert len(ev.Scalars("eval_loss")) == 2
    config = ev.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"report_to": "tensorboard"' in config and f'"output": "{out}"' in config


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_missing_tracker_is_one_line_before_anything(setup, tmp_path, name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # hidden: find_spec and import see no such package
    assert importlib.util.find_spec(name) is None
    with pytest.raises(QLoraError) as e:
        train(cfg(setup, tmp_path / "r", report_to=f"tensorboard,{name}"), log=lambda m: None)
    assert f"qlora[{name}]" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()


def test_unknown_tracker(setup, tmp_path):
    with pytest.raises(QLoraError, match="unknown tracker 'comet'"):
        train(cfg(setup, tmp_path / "r", report_to="tensorboard,comet"), log=lambda m: None)
    assert not (tmp_path / "r").exists()


def test_only_the_main_process_reports(tmp_path):
    with open_trackers("tensorboard", tmp_path, {"a": 1}, main=False) as t:
        t.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "tb").exists()
    with open_trackers("none", tmp_path, {"a": 1}) as t:
        assert t.sinks == []


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _wandb_records(raw: bytes):
    """The records of a .wandb transaction log (wandb 0.31 ships no Python reader): a 7-byte header
    (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks (crc32 u32, length u16, type u8:
    1 full, 2 first, 3 middle, 4 last), as W&B's datastore format documents."""
    import struct
    import zlib
    assert raw[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    pos, block, part = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == 0:
            continue
        assert zlib.crc32(bytes([kind]) + data) & 0xFFFFFFFF == crc, "bad chunk checksum"
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):
            yield part


def test_wandb_offline_run_files_hold_the_metrics(tmp_path, monkeypatch):
    """The rows as the training loop hands them over (train -> open_trackers is the TensorBoard test's;
    here no training, so W&B's own start-up is the test's only cost)."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'qlora[wandb]')")
    from wandb.proto import wandb_internal_pb2
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "r"
    out.mkdir()
    want = [{"step": s, "loss": 3.0 / s, "lr": 1e-4 * s, "grad_norm": 0.5 + s, "tokens": 100 * s, "tok_s": 12.5}
            for s in (1, 2, 3)] + [{"step": 3, "eval_loss": 2.25}]
    with open_trackers("wandb", out, {"report_to": "wandb", "output": str(out), "lr": 1e-4}) as t:
        for r in want:
            t.log(r)
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, config = [], {}
    for data in _wandb_records(files[0].read_bytes()):  # each a wandb Record protobuf (W&B's own schema)
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif rec.WhichOneof("record_type") in ("config", "run"):  # the config: in the run record, then updates
            upd = rec.config.update if rec.HasField("config") else rec.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in upd})
    got = {}
    for h in history:  # W&B merges the rows logged at one step into one history row
        got.setdefault(int(h["_step"]), {}).update(h)
    assert sorted(got) == [1, 2, 3]
    for r in want:
        for k, v in r.items() - {("step", r["step"])}:
            assert got[r["step"]][k] == pytest.approx(v, rel=1e-6), (r["step"], k)
    assert config["report_to"] == "wandb" and config["output"] == str(out)


def test_mlflow_file_store_read_back_with_its_client(setup, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'qlora[mlflow]')")
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "r"
    train(cfg(setup, out, report_to="mlflow", max_steps=3, save_every=0, val_split=0.2, eval_every=3),
          log=lambda m: None)
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("qlora")
    (run,) = client.search_runs([exp.experiment_id])
    rows = _rows(out)
    for name in ("loss", "lr", "grad_norm", "tokens", "eval_loss"):
        want = [(r["step"], r[name]) for r in rows if name in r]
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert [s for s, _ in got] == [s for s, _ in want], name
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), name
    assert run.data.params["report_to"] == "mlflow" and run.data.params["output"] == str(out)
    assert run.info.status == "FINISHED"
