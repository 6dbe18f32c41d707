# syntax=docker/dockerfile:1.7
# openloops trainer worker: `python -m data_plane.trainer` (torch + peft LoRA on CUDA).
# The Kubernetes backend sets the container command itself; CMD is for standalone runs.
#   docker build -f docker/trainer.Dockerfile -t openloops/trainer:0.1.0 .
# The base image's torch is kept (pinned by a constraint) so pip does not swap in another
# CUDA build.
ARG TORCH_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${TORCH_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/var/cache/openloops/huggingface
# jemalloc: the control plane preloads it into trainer processes (LD_PRELOAD=libjemalloc.so.2,
# OPENLOOPS_TRAINER_ALLOCATOR)
RUN apt-get update && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/openloops
COPY pyproject.toml README.md* ./
COPY control_plane ./control_plane
COPY data_plane ./data_plane
COPY migrations ./migrations
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt ".[trainer]" \
 && rm -rf /tmp/constraints.txt build \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin openloops \
 && mkdir -p "$HF_HOME" && chown -R 10001:10001 /var/cache/openloops
USER 10001:10001
WORKDIR /home/openloops
CMD ["python", "-m", "data_plane.trainer"]
