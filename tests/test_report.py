"""The run report (qlora/report.py): written after train, after an interrupted-then-resumed run and by
`qlora report OUT`; its numbers are metrics.jsonl's (parsed back from report.md); self-contained HTML;
a note instead of charts without matplotlib; rendered by headless Chromium where it is installed."""
import json
import re
import shutil
import subprocess
import sys

import pytest

from helpers import cfg
from qlora import report
from qlora.cli import main
from qlora.train import train
from test_validation import setup  # noqa: F401  (100 records: 8 held out)


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def md_table(md: str, title: str) -> list[list[str]]:
    block = md.split(f"## {title}\n\n", 1)[1].split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def check_numbers(out):
    rows, md = metrics(out), (out / "report.md").read_text()
    evals = [r for r in rows if "eval_loss" in r]
    got = md_table(md, "Evaluations")
    assert [int(g[0]) for g in got] == [r["step"] for r in evals]
    assert [float(g[2]) for g in got] == [r["eval_loss"] for r in evals]
    assert [float(g[4]) for g in got] == [r["contains"] for r in evals]
    run = dict(md_table(md, "Run"))
    steps = [r for r in rows if "loss" in r]
    assert int(run["steps"]) == steps[-1]["step"] and float(run["final_loss"]) == steps[-1]["loss"]
    assert int(run["tokens"]) == steps[-1]["tokens"] and float(run["best_eval_loss"]) == min(r["eval_loss"] for r in evals)
    assert [s for s in (r["step"] for r in steps)] == list(range(1, steps[-1]["step"] + 1))  # no step twice
    for w in (r["warning"] for r in rows if "warning" in r):
        assert w in md


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("rep") / "run"
    train(cfg(setup, out, max_steps=4, eval_every=2, save_every=0, eval_max_new_tokens=4, eval_samples=4,
              compare_prompts=2), log=lambda m: None)
    return out


def test_report_after_train_is_self_contained_and_matches_metrics(run):
    check_numbers(run)
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1  # one figure: loss, lr, grad norm, tokens/s, lengths
    assert not re.search(r"""(src|href)=['"]?(https?:|//)""", page)  # nothing fetched
    answers = json.loads((run / "answers.json").read_text())["items"]
    assert md_table((run / "report.md").read_text(), "Answers before and after training")[0][0] == answers[0]["question"]
    data = dict(md_table((run / "report.md").read_text(), "Data"))
    assert int(data["validation"]) == 8 and int(data["examples"]) == 92


def test_qlora_report_rebuilds_it(run, capsys):
    md = (run / "report.md").read_text()
    (run / "report.md").unlink()
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == md and (run / "report.html").is_file()
    assert main(["report", str(run / "adapter")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_report_after_interrupted_then_resumed_run(setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    kw = dict(max_steps=6, save_every=3, eval_every=3, eval_max_new_tokens=2, eval_samples=2, compare_prompts=0)
    train(cfg(setup, out, **kw), log=lambda m: None)
    shutil.rmtree(out / "checkpoints" / "step-0000006")  # as if it had died after step 3
    for name in ("report.md", "report.html"):
        (out / name).unlink()
    train(cfg(setup, out, resume=True, **kw), log=lambda m: None)
    check_numbers(out)


def test_without_matplotlib_the_report_says_so(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report.write_report(run)
    page = (run / "report.html").read_text()
    assert report.NO_CHARTS in page and "data:image/png" not in page
    check_numbers(run)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (headless)")
def test_chromium_renders_the_report(run, tmp_path):
    from PIL import Image
    report.write_report(run)
    png = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1000,1400", (run / "report.html").as_uri()], check=True, timeout=60,
                   capture_output=True)
    img = Image.open(png).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert img.size == (1000, 1400) and len(colors) > 50  # text and chart lines, not a blank page
