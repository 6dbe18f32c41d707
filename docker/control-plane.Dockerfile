# syntax=docker/dockerfile:1.7
# openloops control plane: `openloops serve` (API + controller) and `openloops admin ...`.
# No torch/vLLM in here. Build from the repository root:
#   docker build -f docker/control-plane.Dockerfile -t openloops/control-plane:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY control_plane ./control_plane
COPY data_plane ./data_plane
COPY migrations ./migrations
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels openloops \
 && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin openloops
USER 10001:10001
WORKDIR /home/openloops
EXPOSE 8000
ENTRYPOINT ["openloops"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
