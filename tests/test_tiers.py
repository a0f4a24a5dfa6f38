"""The fast tier (``pytest -m "not slow"``) stays fast: its tests load no real model, start no
Python process and run torch on one thread (see conftest.py)."""

import subprocess

import pytest
import torch
from conftest import run_python

import shortgpt_hf.sources


def test_a_fast_test_may_not_load_a_real_model():
    with pytest.raises(AssertionError, match="loads the real model smollm2-135m: mark it @pytest.mark.slow"):
        shortgpt_hf.sources.builtin_path("smollm2-135m")


def test_a_fast_test_may_not_start_python_but_may_run_small_tools():
    with pytest.raises(AssertionError, match="starts a Python process .*: mark it @pytest.mark.slow"):
        run_python("pass")
    with pytest.raises(AssertionError, match="mark it @pytest.mark.slow"):
        subprocess.run(["shortgpt", "--help"], capture_output=True)
    assert subprocess.run(["true"]).returncode == 0


def test_a_fast_test_runs_torch_on_one_thread():
    assert torch.get_num_threads() == 1
