"""Compare's answers through the real app as a browser gets them: the queue's event stream, every message timed.

    python app.py --port 7922 --runs-dir RUNS &          # the app, as a user starts it
    flock -x /tmp/phi3-cpu.lock python -m bench.app_stream http://127.0.0.1:7922/ RUN_ID --repeats 3

Each answer is one call of the `compare` endpoint exactly as the page makes it (POST queue/join, then the
queue/data event stream, no gradio_client processing in between), a fresh conversation per prompt (bench.pair_answers'
5 prompts, their system prompt in Compare's System box). Per answer it prints one JSON line: the wall seconds from the
join to the completed message, the time to the first visible token (the first message in which either chat's answer
is not empty), the number of messages the server streamed, and the longer answer's tokens (re-tokenized with the
model's tokenizer, capped at the budget): tokens/s per side = those tokens over the wall seconds (the rate both texts
grow at while both stream, as bench.pair_answers counts it). One answer first loads the engine (not counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from typing import Any, Iterator

from bench.pair_answers import PROMPTS


def queue_outputs(url: str, fn_index: int, data: list[Any]) -> Iterator[tuple[bool, list[Any]]]:
    """One queued call exactly as the page makes it (POST queue/join, then the queue/data event stream): (False,
    the outputs with this update's diffs applied) per streamed update, then (True, the final outputs)."""
    import httpx
    from gradio_client.utils import apply_diff

    base, session = url.rstrip("/"), uuid.uuid4().hex[:10]
    httpx.post(f"{base}/gradio_api/queue/join", timeout=60,
               json={"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None,
                     "trigger_id": None}).raise_for_status()
    state: list[Any] | None = None
    with httpx.stream("GET", f"{base}/gradio_api/queue/data", params={"session_hash": session}, timeout=600) as s:
        for line in s.iter_lines():
            msg = json.loads(line[6:]) if line.startswith("data: ") else {}
            if msg.get("msg") == "process_generating":
                out = msg["output"]["data"]
                state = out if state is None else [apply_diff(old, d) for old, d in zip(state, out)]
                yield False, state
            elif msg.get("msg") == "process_completed":
                assert msg.get("success"), msg
                yield True, msg["output"]["data"]
                return
    raise RuntimeError("the call never completed")


def call(url: str, fn_index: int, data: list[Any]) -> dict[str, Any]:
    """One queued call, timed message by message: wall, first visible token, messages, final outputs."""
    started = time.monotonic()
    first = None
    messages = 0
    for final, outputs in queue_outputs(url, fn_index, data):
        if final:
            return {"wall": time.monotonic() - started, "first": first, "messages": messages,
                    "base": _answer(outputs[0]), "tuned": _answer(outputs[1]), "status": str(outputs[3])}
        messages += 1
        if first is None and any(_answer(chat) for chat in outputs[:2]):
            first = time.monotonic() - started
    raise RuntimeError("the call never completed")


def _answer(chat: Any) -> str:
    chat = (chat or {}).get("value", chat) if isinstance(chat, dict) else chat
    if not chat or chat[-1].get("role") != "assistant":
        return ""
    content = chat[-1].get("content")
    if isinstance(content, list):  # gradio 5+: [{"type": "text", "text": ...}]
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("run_id")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--label", default="")
    parser.add_argument("--prompt", type=int, default=None, help="only this one of the 5 prompts (0-4)")
    args = parser.parse_args()
    import httpx
    from transformers import AutoTokenizer

    from phi3_lora import embedded

    tokenizer = AutoTokenizer.from_pretrained(str(embedded.embedded_model_dir()))
    config = httpx.get(args.url.rstrip("/") + "/config", timeout=60).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "compare")

    def data(history: list[dict[str, str]]) -> list[Any]:
        system = history[0]["content"] if history[0]["role"] == "system" else ""
        return [history[-1]["content"], args.run_id, args.temperature, 0.9, args.max_new, 0, [], [], None, system]

    call(args.url, fn_index, data(PROMPTS[0]))  # loads the engine (and, where cached, the compiled pair)
    rows, answers = [], {}
    for repeat in range(args.repeats):
        for i, history in enumerate(PROMPTS):
            if args.prompt is not None and i != args.prompt:
                continue
            r = call(args.url, fn_index, data(history))
            tokens = max(min(len(tokenizer(t, add_special_tokens=False)["input_ids"]), args.max_new)
                         for t in (r["base"], r["tuned"]))
            same = answers.setdefault(i, (r["base"], r["tuned"])) == (r["base"], r["tuned"])
            row = {"label": args.label, "prompt": i, "repeat": repeat, "wall_s": round(r["wall"], 3),
                   "first_token_s": round(r["first"], 3) if r["first"] is not None else None,
                   "messages": r["messages"], "tokens": tokens, "tok_s_per_side": round(tokens / r["wall"], 2),
                   "same_as_first": same, "compiled_pair": "step is prepared" in r["status"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not rows:
        return
    summary = {"label": args.label, "answers": len(rows)}
    for key in ("tok_s_per_side", "wall_s", "first_token_s", "messages"):
        values = [r[key] for r in rows if r[key] is not None]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    long = [r["tok_s_per_side"] for r in rows if r["tokens"] == args.max_new]
    if long:
        summary[f"tok_s_per_side_{args.max_new}_token_answers"] = {"n": len(long), "median": statistics.median(long),
                                                                    "min": min(long), "max": max(long)}
    summary["answers_equal"] = all(r["same_as_first"] for r in rows)
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
