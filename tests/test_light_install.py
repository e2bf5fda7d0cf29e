"""A lighter install: matplotlib is optional (the `plot` extra). Hidden, a run trains as usual, writes
no loss.png and says so in one line (test_train checks loss.png where matplotlib is installed)."""
import sys

from qlora.train import NO_PLOT, train

from helpers import cfg


def test_training_without_matplotlib_skips_the_plot_with_one_line(setup, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out, said = tmp_path / "r", []
    train(cfg(setup, out, max_steps=2, save_every=0), log=said.append)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    assert not (out / "loss.png").exists() and not (out / "loss.tmp.png").exists()
    assert said.count(NO_PLOT) == 1 and "\n" not in NO_PLOT and "qlora[plot]" in NO_PLOT

