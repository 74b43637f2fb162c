#!/usr/bin/env bash
# Builds .whl/ for the device tool's `run` (carry=[".whl"]; bench/device_call.sh installs it there, where nothing
# can be downloaded):
#   .whl/proj  this project's pins that the GPU machine's image lacks (its torch 2.11 / transformers 5.17 stay), and
#              cuDNN's Python frontend for speed/cudnn_ragged.py (off by default, options.CUDNN_RAGGED)
#   .whl/uns   Unsloth and the pins it needs (trl <= 1.15, datasets < 5), installed into a folder of their own
#   .whl/flow  what bench/gpu_flow.sh needs beyond .whl/proj: the scorers (rouge-score, built here as it ships only
#              as source, and sacrebleu) with their dependencies
#   .whl/phi3_tokenizer  the bench's Phi-3 tokenizer folder (made here from tests/assets' GGUF: transformers derives
#              the BPE merges from the vocabulary, 40-50 s that every device call spent otherwise)
# The carried tree must stay under 64 MiB, so the wheels are slimmed: bitsandbytes keeps only its CUDA 13 libraries
# (the image's torch is a cu130 build) and Unsloth drops its studio/ web app. Run from the repository root:
#   bash bench/carry_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
P=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any
   --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
rm -rf .whl && mkdir -p .whl/proj .whl/uns .whl/flow
python3 -m pip download -q "${P[@]}" -d .whl/proj trl==1.16.0 datasets==5.2.0 peft==0.21.2 bitsandbytes==0.50.2 \
    liger-kernel==0.8.5 gguf==0.19.0 dill==0.4.1 multiprocess==0.70.19 nvidia-cudnn-frontend==1.14.1
python3 -m pip download -q "${P[@]}" -d .whl/uns unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 \
    datasets==4.8.5 torchao==0.18.0 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0 \
    cut_cross_entropy==25.1.1 msgspec==0.23.0 hf_transfer==0.1.9 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 json5==0.17.3 nest-asyncio==1.6.0 structlog==26.1.0
python3 -m pip wheel -q --no-deps -w .whl/flow rouge-score==0.1.2
python3 -m pip download -q "${P[@]}" -d .whl/flow sacrebleu==2.6.0 portalocker==3.2.0 tabulate==0.9.0 colorama==0.4.6 \
    lxml==6.0.2 regex==2025.11.3 nltk==3.9.2 absl-py==2.3.1 six==1.17.0 joblib==1.5.2 click==8.3.1 defusedxml==0.7.1
python3 - <<'PY'
import glob, os, re, zipfile

def slim(path: str, drop) -> None:
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not drop(item.filename):
                dst.writestr(item, src.read(item.filename))
    os.replace(tmp, path)

slim(glob.glob(".whl/proj/bitsandbytes-*.whl")[0],
     lambda n: bool(re.search(r"libbitsandbytes_(cuda1[0-2]\d|rocm)", n)))
slim(glob.glob(".whl/uns/unsloth-2026*.whl")[0], lambda n: n.startswith("studio/"))
PY
python3 -c "from pathlib import Path; from bench.model_folders import ensure_tokenizer; ensure_tokenizer(Path('.whl/phi3_tokenizer'))"
du -sh .whl/proj .whl/uns .whl/flow .whl/phi3_tokenizer
