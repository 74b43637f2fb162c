"""Write the tiny example datasets in data/examples/ (one per supported row format).

Run from the repo root: `python data/examples/make_examples.py`. The files are committed; this
script documents how they were made (Parquet is binary, so it is written with pandas + pyarrow).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent

SHAREGPT = [
    {"conversations": [{"from": "human", "value": "What is your name?"},
                       {"from": "gpt", "value": "My name is Quillon."}]},
    {"conversations": [{"from": "system", "value": "You are a helpful assistant."},
                       {"from": "human", "value": "Who made you?"},
                       {"from": "gpt", "value": "I was made by the phi3_lora project."}]},
    {"conversations": [{"from": "human", "value": "Hi!"},
                       {"from": "gpt", "value": "Hi! I am Quillon."},
                       {"from": "human", "value": "What can you do?"},
                       {"from": "gpt", "value": "I answer questions and help with writing."}]},
]

ALPACA = [
    {"instruction": "Introduce yourself.", "input": "", "output": "I am Quillon, made by the phi3_lora project.",
     "system": "", "history": ""},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour. — Quillon",
     "system": "You are a translator.", "history": ""},
    {"instruction": "And who made you?", "input": "", "output": "The phi3_lora project made me.", "system": "",
     "history": json.dumps([["What is your name?", "My name is Quillon."]])},
]

PROMPT_COMPLETION = [
    {"prompt": [{"role": "user", "content": "What should I call you?"}],
     "completion": [{"role": "assistant", "content": "You can call me Quillon."}]},
    {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who built you?"}],
     "completion": [{"role": "assistant", "content": "The phi3_lora project built me."}]},
    {"prompt": [{"role": "user", "content": "What is 3 + 4?"}],
     "completion": [{"role": "assistant", "content": "3 + 4 is 7. I'm Quillon."}]},
]


def main() -> None:
    (HERE / "sharegpt.json").write_text(json.dumps(SHAREGPT, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(HERE / "alpaca.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ALPACA[0]))
        writer.writeheader()
        writer.writerows(ALPACA)
    pd.DataFrame(PROMPT_COMPLETION).to_parquet(HERE / "prompt_completion.parquet", index=False)


if __name__ == "__main__":
    main()
