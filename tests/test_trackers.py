"""--report-to (qlora.trackers): TensorBoard events read back with TensorBoard's own EventAccumulator
equal metrics.jsonl; a tracker that is not installed or not known is one line before anything is written."""
import importlib.util
import json

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
def test_missing_tracker_is_one_line_before_anything(setup, tmp_path, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
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
