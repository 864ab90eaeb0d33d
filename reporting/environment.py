"""The environment a measurement was taken in (CPU model and ISA, threads, torch, git commit, date) and
writers that put it at the head of every result file: JSON {"environment": ..., "results": ...} or CSV
after `# key: value` comment lines (values JSON-encoded, so types survive). Writes are atomic.
No hostname: result files get shared."""
import csv
import datetime
import io
import itertools
import json
import os
import platform
import subprocess

import torch

from utils.machine import ISA_FEATURES, cpu_model_and_isa, parse_cpuinfo  # noqa: F401 (re-exported)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(root=ROOT):
    """Short hash of HEAD, with "-dirty" when `git status --porcelain` lists changes; None outside a checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        return head.stdout.strip() + ("-dirty" if git("status", "--porcelain").stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment():
    """What a reader needs to compare a number with theirs; the same keys on every machine."""
    model, isa = cpu_model_and_isa()
    return {"cpu_model": model, "isa": isa, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def env_key(env):
    """"cpu_model | isa | torch": which machine and software a number came from, in one cell."""
    return f"{env['cpu_model']} | {env['isa']} | {env['torch']}"


def describe(env):
    """One line for a benchmark's output: CPU model and ISA, threads, torch."""
    return f"{env['cpu_model']} ({env['isa'] or 'no AVX2'}), {env['threads']} threads, torch {env['torch']}"


def _write_atomic(path, text):
    # A temporary file in the same folder, then a rename: an interrupted write leaves the old file or none.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, results, env=None):
    """{"environment": env (default: environment()), "results": results}, indented."""
    doc = {"environment": environment() if env is None else env, "results": results}
    _write_atomic(path, json.dumps(doc, indent=2) + "\n")


def write_csv(path, rows, env=None):
    """`# key: value` lines (env, default environment(); values JSON), then a header and `rows` (dicts)."""
    env = environment() if env is None else env
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    out.writelines(f"# {k}: {json.dumps(v)}\n" for k, v in env.items())
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(path, out.getvalue())


def read_csv(path):
    """(env, rows) of a file write_csv wrote; rows are dicts of strings, as csv reads them."""
    env = {}
    with open(path, newline="") as f:
        line = f.readline()
        while line.startswith("# "):
            key, _, value = line[2:].partition(": ")
            env[key] = json.loads(value)
            line = f.readline()
        return env, list(csv.DictReader(itertools.chain([line], f)))  # `line` is the header
