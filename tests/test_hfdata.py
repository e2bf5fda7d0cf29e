"""Data sets (qlora.hfdata): folders written by datasets' save_to_disk, hf:org/name[:split] from a
Hugging Face cache (offline), --data-field renaming; read back against datasets' own readers."""
import json

import datasets
import pytest
from huggingface_hub import constants

from qlora.data import read_records
from qlora.errors import QLoraError

from helpers import make_hub_cache

ROWS = [{"question": f"what is {i} ?", "answer": f"it is {i} .", "id": i} for i in range(5)]
FIELDS = "question=instruction,answer=output"


def _alpaca(rows):
    return [{"instruction": r["question"], "output": r["answer"], "id": r["id"]} for r in rows]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds-cache")


def test_save_to_disk_folder_with_fields(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    want = datasets.load_from_disk(str(tmp_path / "saved")).to_list()
    records, fmt = read_records(tmp_path / "saved", fields=FIELDS)
    assert fmt == "alpaca" and records == _alpaca(want)
    assert records[2].where == f"{tmp_path / 'saved'}:row 3"
    with pytest.raises(QLoraError, match="cannot tell the format"):  # without the mapping: unknown keys
        read_records(tmp_path / "saved")


def test_dataset_dict_splits(tmp_path):
    d = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:3]), test=datasets.Dataset.from_list(ROWS[3:]))
    d.save_to_disk(str(tmp_path / "dd"))
    assert read_records(tmp_path / "dd", fields=FIELDS)[0] == _alpaca(ROWS[:3])  # train by default
    assert read_records(f"{tmp_path / 'dd'}:test", fields=FIELDS)[0] == _alpaca(ROWS[3:])
    with pytest.raises(QLoraError) as e:
        read_records(f"{tmp_path / 'dd'}:validation", fields=FIELDS)
    assert "no split 'validation'" in str(e.value) and "train, test" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    src = tmp_path / "src" / "data"
    src.mkdir(parents=True)
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    (src / "test.jsonl").write_text(json.dumps(ROWS[4]) + "\n")
    make_hub_cache(tmp_path / "hub", "acme/qa", tmp_path / "src", repo_type="dataset")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_hub_dataset_offline(hub_cache):
    assert read_records("hf:acme/qa", fields=FIELDS)[0] == _alpaca(ROWS[:4])
    assert read_records("hf:acme/qa:test", fields=FIELDS)[0] == _alpaca(ROWS[4:])


@pytest.mark.parametrize("spec, words", [("hf:acme/qa:dev", "no split 'dev'"),
                                         ("hf:acme/absent", "HF_HUB_OFFLINE=1"),
                                         ("hf:nonsense", "expected hf:org/name")])
def test_hub_dataset_errors_are_one_line(hub_cache, spec, words):
    with pytest.raises(QLoraError) as e:
        read_records(spec, fields=FIELDS)
    assert words in str(e.value) and spec in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("fields, words", [("question", "COLUMN=FIELD"), ("query=instruction", "no column 'query'")])
def test_bad_data_field(tmp_path, fields, words):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(QLoraError, match=words):
        read_records(tmp_path / "d.jsonl", fields=fields)


def test_missing_datasets_package(tmp_path, monkeypatch):
    import sys
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(QLoraError, match=r"qlora\[datasets\]"):
        read_records(tmp_path / "saved")
