"""`python app.py`: serve the phi3_lora app on http://127.0.0.1:7860 (flags: --host --port --share --auth
--model --runs-dir --demo). Works offline on the embedded model; models load on first use, so the page is fast.
On a Hugging Face Space it also reads the Space's environment (phi3_lora.spaces): storage, ZeroGPU, OAuth."""

from __future__ import annotations

import argparse
import os
import sys

from phi3_lora import spaces
from phi3_lora.runs import default_runs_dir

# Before anything imports huggingface_hub (it reads HF_HOME once): on a Space with persistent storage the
# Hub cache goes to /data, so base models survive a restart.
SPACE = spaces.detect()
spaces.apply_environment(SPACE)

from phi3_lora.ui import AppOptions, build_app, launch, login
from phi3_lora.ui.common import configure_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The phi3_lora web app: dataset, settings, training, compare, export.")
    # Spaces (and Docker images) say where to listen through Gradio's own variables.
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="Interface to listen on (0.0.0.0 for every interface).")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                   help="Port to serve on.")
    p.add_argument("--share", action="store_true", help="Also ask Gradio for a temporary public link (ignored on "
                                                       "a Space, which is already public).")
    p.add_argument("--auth", metavar="USER:PASS", help="Require this user name and password (visible to other users "
                                                       "of this machine in `ps`: prefer --auth-file or PHI3_LORA_AUTH).")
    p.add_argument("--auth-file", dest="auth_file", metavar="FILE",
                   help="Require a login from this file: one user:password per line (# comments allowed).")
    p.add_argument("--model", default="auto", help="Default base model: auto, a Hub id, a local folder, or "
                                                   "'embedded: SmolLM2-135M-Instruct'.")
    p.add_argument("--runs-dir", dest="runs_dir", default=None, help="Where run folders are kept (default: "
                   "$PHI3_LORA_RUNS, else ./runs; on a Space with persistent storage: /data/phi3_lora/runs).")
    p.add_argument("--demo", action="store_true", help="Demo mode: training is refused (also PHI3_LORA_DEMO_MODE=1); "
                                                      "Compare works with published adapters.")
    return p.parse_args(argv)


def app_options(runs_dir: str | None = None, model: str = "auto", demo: bool = False) -> AppOptions:
    """The app's options, with what the Space (if any) decides: storage, demo mode, login, default model."""
    demo_mode = spaces.demo_mode(flag=demo)
    return AppOptions(runs_dir=spaces.runs_dir(SPACE, runs_dir or default_runs_dir()), default_model=spaces.default_model(SPACE, model),
                      demo_mode=demo_mode, storage_warning=spaces.storage_warning(SPACE), space_env=SPACE,
                      login_required=spaces.login_required(SPACE, demo_mode))


def parse_auth(args: argparse.Namespace) -> list[tuple[str, str]]:
    """--auth, else --auth-file, else $PHI3_LORA_AUTH (the file and the variable keep the password out of ps)."""
    try:
        return login.load_credentials(args.auth, args.auth_file)
    except ValueError as exc:
        sys.exit(f"error: {exc}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging()
    auth = parse_auth(args)
    args.share, note = spaces.share_decision(SPACE, args.share)
    if note:
        print(note, flush=True)  # stdout is the Space's log
    options = app_options(args.runs_dir, args.model, args.demo)
    options.shared = args.share  # a share link makes everyone on the web a visitor, even if the tunnel fails
    if options.storage_warning:
        print(f"Warning: {options.storage_warning}", flush=True)
    demo = build_app(options=options)
    from phi3_lora.models import resolve_name

    name, reason = resolve_name(options.default_model)
    print(f"Default model: {name}: {reason}. Runs are kept in {options.runs_dir}.", flush=True)
    try:
        _, local_url, share_url = launch(demo, host=args.host, port=args.port, share=args.share, auth=auth,
                                         prevent_thread_lock=True, quiet=True)
    except Exception as exc:  # a share tunnel that fails inside launch must not take the local app down
        if not args.share:
            raise
        print(f"No public link: {exc}. Serving locally only.", flush=True)
        _, local_url, share_url = launch(demo, host=args.host, port=args.port, share=False, auth=auth,
                                         prevent_thread_lock=True, quiet=True)
    # Our own line instead of Gradio's (quiet=True): its hint says "set share=True in launch()"; here it is a flag.
    print(f"Running on {local_url}" + ("" if args.share or SPACE.on_space else
                                        "  (python app.py --share also asks for a temporary public link)"),
          flush=True)
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
    demo = build_app(options=app_options())
