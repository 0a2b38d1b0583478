"""Run provenance and atomic writes: every results file records config, seed, git commit and package versions."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

PACKAGES = ("seqrl", "torch", "transformers", "tokenizers", "lightning", "hydra-core", "omegaconf", "wandb",
            "datasets", "math-verify", "lm-eval")


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The HEAD commit of the repository holding `cwd` (None outside a git checkout); '+dirty' if modified."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def provenance(config: dict, seed: int) -> dict[str, Any]:
    return {"config": config, "seed": seed, "git_commit": git_commit(), "versions": versions(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}


def atomic_write(path: Path, write, mode: str = "w") -> None:
    """Call write(f) on a temporary file beside `path`, fsync, then rename over `path` (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_dir_atomic(path: Path, write) -> None:
    """Fill a directory through write(tmp_dir) beside `path`, then swap it in: readers see the old or the new
    export, never a half-written one (the old one is removed only after the new one is in place)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename: readers never see half a file."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False, default=str))


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    atomic_write(path, lambda f: f.writelines(json.dumps(r, default=str) + "\n" for r in rows))


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))
