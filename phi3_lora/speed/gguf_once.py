"""transformers' GGUF loader reading the file once: the export verification child loads a GGUF tokenizer and model.

Used by gguf_verify's child process only, around its two from_pretrained calls. It swaps two module functions of
the gguf package for the duration (hence here, behind `versions`, with gguf 0.19 and transformers 5.17-5.23).
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Any, Iterator

from phi3_lora.speed import versions

NAME = "gguf_parsed_once"


@contextmanager
def parsed_once() -> Iterator[None]:
    """Loading one GGUF tokenizer and model makes transformers build gguf.GGUFReader on the file three times
    (tokenizer config, model config, weights) and gguf.TensorNameMap once per module (~400 for a 30-layer model):
    for the embedded SmolLM2 that parsing was about half the child's time, and users wait for it. Both are
    read-only products of the same file and the same arguments, so the child keeps the first of each; what is read,
    and by whom, is unchanged (transformers' own loader on gguf's own reader)."""
    if not versions.tested(NAME):  # gguf's module functions swapped: only on the version this was written for
        yield
        return
    import gguf

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map
