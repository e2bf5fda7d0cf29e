"""Hub model ids (qlora.hub): an id resolves to its snapshot in a Hugging Face cache that
huggingface_hub itself reads as valid, offline; a local path wins; a missing id is one line; an
adapter finds the base it records."""
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache

from qlora import hub
from qlora.cli import main
from qlora.errors import QLoraError

from helpers import make_hub_cache
from tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ARGS = ["--prompt", "what color is the sky ?", "--max-new-tokens", "6", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """HF_HOME holding acme/tiny (a tiny model saved with save_pretrained) in its hub cache."""
    root = tmp_path_factory.mktemp("hf")
    src = make_tiny_model(root / "src")
    (src / "pytorch_model.bin").write_bytes(b"never read")  # a pickle beside it must not matter
    make_hub_cache(root / "home" / "hub", "acme/tiny", src, commit=COMMIT)
    return root


@pytest.fixture
def offline(home, monkeypatch):
    """huggingface_hub as it is with HF_HOME=<home> and HF_HUB_OFFLINE=1 (its constants are read at import)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "home" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def test_the_cache_is_valid_for_huggingface_hub(home):
    info = scan_cache_dir(home / "home" / "hub")
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "acme/tiny" and {r.commit_hash for r in repo.revisions} == {COMMIT}
    cfg = try_to_load_from_cache("acme/tiny", "config.json", cache_dir=home / "home" / "hub")
    assert json.loads(Path(cfg).read_text())["model_type"] == "llama"


def test_id_resolves_to_the_snapshot(offline):
    snap = offline / "home" / "hub" / "models--acme--tiny" / "snapshots" / COMMIT
    assert Path(hub.local("acme/tiny")) == snap
    assert Path(hub.local(f"acme/tiny@{COMMIT}")) == snap
    assert hub.local(str(offline / "src")) == str(offline / "src")  # a local path is never looked up
    assert hub.local("shape:llama-8b") == "shape:llama-8b"


def test_local_path_wins(offline, tmp_path, monkeypatch):
    make_tiny_model(tmp_path / "acme" / "tiny", seed=3)
    monkeypatch.chdir(tmp_path)
    assert hub.local("acme/tiny") == "acme/tiny"


def test_missing_id_is_one_line(offline):
    with pytest.raises(QLoraError) as e:
        hub.local("acme/absent")
    assert "HF_HUB_OFFLINE=1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(QLoraError, match="no snapshot"):
        hub.local("acme/tiny@v9")  # a revision the cache does not know


def test_generate_with_an_id_equals_the_local_folder(offline, capsys):
    assert main(["generate", "--model", str(offline / "src"), *ARGS]) == 0
    want = capsys.readouterr().out
    assert main(["generate", "--model", "acme/tiny", *ARGS]) == 0
    got = capsys.readouterr()
    assert got.out == want and got.out.strip()
    assert "loaded acme/tiny" in got.err


def test_adapter_finds_the_base_it_records(offline, tmp_path, capsys):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(offline / "src"))
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(1))
    pm.peft_config["default"].base_model_name_or_path = "acme/tiny"
    pm.save_pretrained(tmp_path / "ad")
    assert main(["generate", "--model", str(offline / "src"), *ARGS]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", "--model", str(offline / "src"), "--adapter", str(tmp_path / "ad"), *ARGS]) == 0
    want = capsys.readouterr().out
    assert want != plain  # the adapter changes the answer
    assert main(["generate", "--adapter", str(tmp_path / "ad"), *ARGS]) == 0
    assert capsys.readouterr().out == want


def test_cli_honours_hf_home_and_offline(home, tmp_path):
    """In a fresh process, HF_HOME and HF_HUB_OFFLINE=1 from the environment: plan reads acme/tiny's
    config from that cache; an id it lacks is one line, exit 2, nothing written."""
    env = dict(os.environ, HF_HOME=str(home / "home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_CACHE", None)
    code = ("import sys; from qlora.cli import main; assert main(['plan', '--model', 'acme/tiny']) == 0; "
            "print('RC', main(['generate', '--model', 'acme/absent', '--prompt', 'hi']), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("acme/tiny: ") and "LoRA r=64" in r.stdout  # plan read the cached config
    err = r.stderr.strip().splitlines()
    assert err[-1] == "RC 2" and "acme/absent" in err[-2] and "HF_HUB_OFFLINE=1" in err[-2]
    assert not any(tmp_path.iterdir())  # nothing written
