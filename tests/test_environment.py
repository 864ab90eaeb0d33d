"""reporting/environment.py: the environment's keys and types, the ISA string from /proc/cpuinfo text, the git
commit (with -dirty, None outside a checkout), the CSV round trip, and writes that never leave a half file."""
import datetime
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from reporting import environment as E

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 {flags}

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 {flags}
"""


def test_environment_keys_and_types():
    env = E.environment()
    assert list(env) == ["cpu_model", "isa", "cpu_count", "threads", "torch", "python", "cuda", "git_commit", "date"]
    assert "hostname" not in env and isinstance(env["cpu_model"], str) and isinstance(env["isa"], str)
    assert env["cpu_count"] == os.cpu_count() and env["threads"] == torch.get_num_threads()
    assert env["torch"] == torch.__version__ and re.fullmatch(r"3\.\d+\.\d+", env["python"])
    assert env["cuda"] is None or isinstance(env["cuda"], str)
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{4,}(-dirty)?", env["git_commit"])
    date = datetime.datetime.fromisoformat(env["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - date) < datetime.timedelta(minutes=1)
    json.dumps(env)  # machine-readable as it is


@pytest.mark.parametrize("flags, isa", [
    ("avx2 avx512f avx512_bf16", "AVX2+AVX-512+AVX512-BF16"),
    ("avx2", "AVX2"),
    ("avx512_bf16 avx512f avx2 amx_bf16 amx_tile amx_int8", "AVX2+AVX-512+AVX512-BF16+AMX"),  # flag order: any
    ("avx2 amx_tile", "AVX2+AMX"),
    ("avx avx512vl avx512_vnni", ""),  # neither AVX2 nor avx512f itself
])
def test_isa_from_cpuinfo_text(flags, isa):
    assert E.parse_cpuinfo(CPUINFO.format(flags=flags)) == ("Intel(R) Xeon(R) Platinum 8488C", isa)


def test_parse_cpuinfo_without_model_or_flags():
    assert E.parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd\n") == (None, "")
    assert E.parse_cpuinfo("") == (None, "")


def test_git_commit_short_hash_dirty_and_none(tmp_path):
    assert E.git_commit(str(tmp_path)) is None  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True)
    assert E.git_commit(str(tmp_path)) == head.stdout.strip()
    (tmp_path / "a.txt").write_text("b")
    assert E.git_commit(str(tmp_path)) == head.stdout.strip() + "-dirty"


def test_csv_round_trip_with_environment_header(tmp_path):
    env = {**E.environment(), "cuda": None, "git_commit": "0123456"}  # a hash of digits stays a string
    rows = [{"variant": "baseline", "seed": "0", "value": "0.9123", "env": "AMD EPYC | AVX2 | 2.5.1"},
            {"variant": 'a "quoted", comma', "seed": "1", "value": "", "env": "line\nbreak"}]
    path = tmp_path / "r.csv"
    E.write_csv(path, rows, env)
    text = path.read_text()
    assert text.startswith(f'# cpu_model: {json.dumps(env["cpu_model"])}\n')
    assert '# cuda: null\n# git_commit: "0123456"\n' in text
    assert text.splitlines()[len(env)] == "variant,seed,value,env"  # the header follows the comment lines
    assert E.read_csv(path) == (env, rows)
    E.write_csv(path, [], env)
    assert E.read_csv(path) == (env, [])


def test_write_json_shape_and_default_environment(tmp_path):
    E.write_json(tmp_path / "sub" / "r.json", {"rows": [1, 2]})  # makes the folder
    doc = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert list(doc) == ["environment", "results"] and doc["results"] == {"rows": [1, 2]}
    assert doc["environment"]["torch"] == torch.__version__


def test_writes_are_atomic(tmp_path, monkeypatch):
    """A finished write leaves only its file; one interrupted before the rename leaves the old file whole and
    no temporary file."""
    env = {"torch": torch.__version__}
    E.write_json(tmp_path / "r.json", {"a": 1}, env)
    E.write_csv(tmp_path / "r.csv", [{"a": 1}], env)
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.json"]

    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        E.write_json(tmp_path / "r.json", {"a": 2}, env)
    with pytest.raises(KeyboardInterrupt):
        E.write_csv(tmp_path / "r.csv", [{"a": 2}], env)
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.json"]
    assert json.loads((tmp_path / "r.json").read_text())["results"] == {"a": 1}
    assert E.read_csv(tmp_path / "r.csv") == (env, [{"a": "1"}])


def test_imports_no_training_code():
    """Any script can record its environment: the module pulls in neither config, train, engine nor tricks."""
    code = ("import sys, reporting.environment; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('config', 'train', 'engine', 'tricks')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-1000:]
