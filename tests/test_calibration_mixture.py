"""Calibration from several sources with weights: each source gets its weight's share of the tokens,
from the API, a request (JSON) and the command line; a bad source or weight is refused before loading."""

import pytest
from conftest import assert_one_line_error, run_cli
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from shortgpt_hf import InvalidRequest, ShortGPTConfig, SourceUnavailable
from shortgpt_hf.calibration import prepare_calibration


@pytest.fixture
def sources(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "more"
    a.write_text(" ".join(f"t{3 + i % 40}" for i in range(900)))
    b.mkdir()
    (b / "one.txt").write_text(" ".join(f"t{50 + i % 40}" for i in range(700)))
    (b / "two.txt").write_text(" ".join(f"t{90 + i % 30}" for i in range(700)))
    return a, b


def test_each_source_gets_its_share_of_the_tokens(sources):
    a, b = sources
    windows = prepare_calibration({str(a): 1, str(b): 3}, tiny_tokenizer(), 50, max_tokens=400)
    tokens = [int(t) for w in windows.windows for t in w]
    assert len(tokens) == 400 and windows.description == f"mix:file:{a.name}*1+folder:{b.name}*3"
    assert sum(t < 50 for t in tokens) == 100 and sum(t >= 50 for t in tokens) == 300  # 1:3, by token ids
    everything = prepare_calibration({str(a): 1, str(b): 1}, tiny_tokenizer(), 50)  # as many as the sources allow
    ids = [int(t) for w in everything.windows for t in w]
    assert sum(t < 50 for t in ids) == sum(t >= 50 for t in ids) == 900  # a has 900; the folder 1,400


def test_a_mixture_of_datasets_and_texts_in_python(sources):
    """In Python a mixture is also a list of ``(data, weight)`` pairs, each any calibration form:
    a datasets.Dataset beside a list of strings and a file, with their shares; bad pairs are refused."""
    from datasets import Dataset

    a, _ = sources
    dataset = Dataset.from_dict({"text": [" ".join(f"t{50 + i % 40}" for i in range(600))]})
    texts = [" ".join(f"t{100 + i % 20}" for i in range(600))]
    windows = prepare_calibration([(dataset, 2), (texts, 1), (str(a), 1)], tiny_tokenizer(), 50, max_tokens=400)
    ids = [int(t) for w in windows.windows for t in w]
    assert (
        sum(50 <= t < 100 for t in ids) == 200 and sum(t >= 100 for t in ids) == 100 and sum(t < 50 for t in ids) == 100
    )
    assert windows.description == f"mix:dataset:text[1]*2+texts:1*1+file:{a.name}*1"
    body = dataset.rename_column("text", "body")  # a mixture reads its Datasets from the column asked for
    by_column = prepare_calibration([(body, 1), (texts, 1)], tiny_tokenizer(), 50, 200, text_column="body")
    assert by_column.description == "mix:dataset:body[1]*1+texts:1*1" and by_column.num_tokens == 200
    with pytest.raises(InvalidRequest, match="weight of calibration source Dataset must be a positive number, got 0"):
        prepare_calibration([(dataset, 0)], tiny_tokenizer(), 50)
    with pytest.raises(InvalidRequest, match="sources are files, folders or data, not mixtures"):
        prepare_calibration([([(texts, 1)], 1)], tiny_tokenizer(), 50)


def test_a_request_keeps_its_sources_through_json(sources, tmp_path):
    a, b = sources
    request = ShortGPTConfig(calibration=[a, b])
    assert request.calibration == {str(a): 1.0, str(b): 1.0}
    assert ShortGPTConfig.from_json_string(request.to_json_string()) == request
    with pytest.raises(InvalidRequest, match="calibration weights must be positive numbers"):
        ShortGPTConfig(calibration={str(a): 0})


def test_the_command_line_takes_several_sources_with_weights(sources, tmp_path, capsys, monkeypatch):
    a, b = sources
    folder = tmp_path / "dense"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    args = ["--n-layers", "2", "--seq-len", "32", "--max-tokens", "400", "--out", tmp_path / "out"]
    code, stdout, err = run_cli(
        capsys, monkeypatch, "prune", folder, "--calibration", a, "--calibration", f"{b}:3", *args
    )
    assert code in (0, None), err
    record = AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.shortgpt
    assert record["calibration"]["description"] == f"mix:file:{a.name}*1+folder:{b.name}*3"
    assert record["calibration"]["num_tokens"] == 400 and record["request"]["calibration"] == {str(a): 1.0, str(b): 3.0}
    missing = tmp_path / "missing.txt"
    again = [*args[:-1], tmp_path / "out2"]
    code, _, err = run_cli(capsys, monkeypatch, "prune", folder, "--calibration", a, "--calibration", missing, *again)
    assert code == 2 and not (tmp_path / "out2").exists()
    assert_one_line_error(err, f"calibration file not found: {missing}")
    with pytest.raises(SourceUnavailable, match="holds no .txt file"):
        prepare_calibration({str(tmp_path / "out"): 1}, tiny_tokenizer(), 32)
