"""The README's Python snippets run as written, in order, in one fresh process, so
they cannot rot.

They check that the calls exist and fit together, not quality (other tests
measure quality on the real model). So the built-in model is replaced by a
stand-in with the same depth (30 layers) and a real byte-level BPE tokenizer
trained on the packaged plays. The Hub id the snippets name is served by the
local Hub server with that same stand-in. The files the snippets read
(training text, a local lm-eval task) are made in the working folder first.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
TOKEN = "hf_readme_token"

PRELUDE = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, TESTS)
from huggingface_hub import HfApi
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from test_evaluation import FACTS, LOCAL_TASK
import shortgpt_hf
from shortgpt_hf.loading import load_model
from shortgpt_hf.texts import calibration_texts, heldout_texts

bpe = Tokenizer(models.BPE(unk_token="<unk>"))
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator(calibration_texts(), trainers.BpeTrainer(
    vocab_size=512, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>")
config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     tie_word_embeddings=True)
stand_in = Path("stand-in").resolve()
LlamaForCausalLM(config).save_pretrained(stand_in)
tokenizer.save_pretrained(stand_in)
HfApi().create_repo("HuggingFaceTB/SmolLM2-135M")
HfApi().upload_folder(repo_id="HuggingFaceTB/SmolLM2-135M", folder_path=stand_in)
shortgpt_hf.load_builtin = lambda name="smollm2-135m", **kwargs: load_model(str(stand_in), **kwargs)

Path("train.txt").write_text(calibration_texts()[0][:20000])
Path("heldout.txt").write_text(heldout_texts()[0][:8000])
Path("facts.jsonl").write_text(
    "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in FACTS))
Path("my_tasks").mkdir()
Path("my_tasks/my_task.yaml").write_text(
    LOCAL_TASK.format(data=Path("facts.jsonl").resolve()).replace("task: tiny_facts", "task: my_task"))
"""


def test_the_readme_has_the_snippets_this_test_expects():
    assert len(BLOCKS) >= 8, "the README lost Python examples; update this test's expectations"
    assert "task: tiny_facts" in __import__("test_evaluation").LOCAL_TASK, (
        "the local lm-eval task is renamed for the README's my_task"
    )


@pytest.mark.slow
def test_readme_python_snippets_run(tmp_path):
    program = PRELUDE + "".join(
        f"\nprint('--- README block {i}', flush=True)\n{block}" for i, block in enumerate(BLOCKS, 1)
    )
    (tmp_path / "work").mkdir()
    with HubServer(token=TOKEN) as hub:
        env = os.environ | dict(
            HF_ENDPOINT=hub.endpoint,
            HF_TOKEN=TOKEN,
            HF_HUB_OFFLINE="0",
            HF_HOME=str(tmp_path / "hf_home"),
            TESTS=str(Path(__file__).parent),
        )
        code = "import os; TESTS = os.environ['TESTS']\n" + program
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path / "work", env=env, capture_output=True, text=True, timeout=1200
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        assert result.stdout.count("--- README block") == len(BLOCKS)
        pushed = {repo: set(hub.files(repo)) for repo in ("your-name/smollm2-135m-shortgpt", "me/smollm2-shortgpt")}
    work = tmp_path / "work"
    for folder in (
        "smollm2-pruned",
        "smollm2-recipe",
        "smollm2-repaired",
        "smollm2-repaired-recipe",
        "smollm2-healed",
        "smollm2-materialized",
    ):
        assert any((work / folder).iterdir()), f"README block wrote no {folder}/"
    assert json.loads((work / "ablation.json").read_text())["runs"] and any((work / "plots").glob("*.png"))
    for files in pushed.values():
        assert {"README.md", "config.json"} <= files
