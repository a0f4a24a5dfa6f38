"""One process of a multi-process healing run (started by tests/test_healing.py
under ``accelerate launch`` with 2 CPU processes): heals a saved pruned tiny
model and writes what this process saw to ``OUT/process<i>.json``."""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM

from shortgpt_hf.calibration import TokenWindows
from shortgpt_hf.recovery import heal, save_healed

pruned, out, steps, batch_size, accumulation = (
    Path(sys.argv[1]),
    Path(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    int(sys.argv[5]),
)
tokens = torch.load(out / "tokens.pt")

seen: list[int] = []  # the first token of every window this process's DataLoader batched: each window's id
pad = TokenWindows.pad


def spy(chunk, pad_id):
    seen.extend(int(w[0]) for w in chunk)
    return pad(chunk, pad_id)


TokenWindows.pad = staticmethod(spy)
rates: list[float] = []
model = AutoModelForCausalLM.from_pretrained(pruned, attn_implementation="eager")
healed = heal(
    model,
    tokens,
    seq_len=tokens.shape[1],
    steps=steps,
    batch_size=batch_size,
    gradient_accumulation_steps=accumulation,
    lr=1e-2,
    progress=False,
    callback=lambda step, m, logs: rates.append(logs["lr"]),
)
save_healed(healed, out / "adapter")
process = healed.get_base_model().config.shortgpt["recovery"][-1]
lora = {name: p.detach().flatten()[:8].tolist() for name, p in healed.named_parameters() if "lora_" in name}
record = {"seen": seen, "rates": rates, "tokens": process["tokens"], "processes": process["processes"], "lora": lora}
(out / f"process{PartialState().process_index}.json").write_text(json.dumps(record))
