"""`python app.py`: serve the phi3_lora app on http://127.0.0.1:7860 (flags: --host --port --share --auth
--model --runs-dir). Works offline on the embedded model; models load on first use, so the page is fast."""

from __future__ import annotations

import argparse
import sys

from phi3_lora.ui import AppOptions, build_app, launch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The phi3_lora web app: dataset, settings, training, compare, export.")
    p.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 for every interface).")
    p.add_argument("--port", type=int, default=7860, help="Port to serve on.")
    p.add_argument("--share", action="store_true", help="Also ask Gradio for a temporary public link.")
    p.add_argument("--auth", metavar="USER:PASS", help="Require this user name and password.")
    p.add_argument("--model", default="auto", help="Default base model: auto, a Hub id, a local folder, or "
                                                   "'embedded: SmolLM2-135M-Instruct'.")
    p.add_argument("--runs-dir", dest="runs_dir", default="runs", help="Where run folders are kept.")
    return p.parse_args(argv)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        sys.exit("error: --auth must look like user:password")
    return user, password


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    auth = parse_auth(args.auth)
    demo = build_app(options=AppOptions(runs_dir=args.runs_dir, default_model=args.model))
    try:
        _, local_url, share_url = launch(demo, host=args.host, port=args.port, share=args.share, auth=auth,
                                         prevent_thread_lock=True)
    except Exception as exc:  # a share tunnel that fails inside launch must not take the local app down
        if not args.share:
            raise
        print(f"No public link: {exc}. Serving locally only.", flush=True)
        _, local_url, share_url = launch(demo, host=args.host, port=args.port, share=False, auth=auth,
                                         prevent_thread_lock=True)
    if args.share:
        if share_url:
            print(f"Public link: {share_url}", flush=True)
        else:
            print("No public link: Gradio's share tunnel needs internet access to gradio.live, which this machine "
                  f"does not have (or it refused). The app keeps serving at {local_url}", flush=True)
    demo.block_thread()


# A module-level `demo` for `gradio app.py` reload mode and the Space build.
if __name__ == "__main__":
    main()
else:
    demo = build_app()
