"""uploads.copy_atomic as gradio calls it: events run in threads, so two visitors' sessions may copy the same file to
the same place (a kept copy, a draft) at the same moment. Real threads, real files."""

from __future__ import annotations

import threading
from pathlib import Path

from phi3_lora import uploads

WRITERS = 4
ROUNDS = 150
SIZE = 256 * 2**10  # large enough that copies overlap


def test_copies_to_one_place_at_once_leave_one_whole_copy_and_no_temporary(tmp_path: Path) -> None:
    sources = []
    for i in range(WRITERS):
        src = tmp_path / f"source-{i}.jsonl"
        src.write_bytes(bytes([65 + i]) * SIZE)
        sources.append(src)
    dest = tmp_path / "kept" / "copy.jsonl"
    errors: list[BaseException] = []
    for _ in range(ROUNDS):
        start = threading.Barrier(WRITERS)

        def copy(src: Path) -> None:
            start.wait()
            try:
                uploads.copy_atomic(src, dest)
            except BaseException as exc:  # noqa: BLE001 - every failure of a writer is the finding
                errors.append(exc)

        threads = [threading.Thread(target=copy, args=(src,)) for src in sources]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[:3]
        got = dest.read_bytes()
        assert any(got == src.read_bytes() for src in sources), (len(got), sorted(set(got)))
        assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no temporary left behind
