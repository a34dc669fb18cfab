# The ZeroC services' images (docs/docker.md). Two targets, each a build stage and a runtime stage:
#
#   docker build --target cpu  -t zeroc:cpu  .     FROM $BASE_IMAGE       (default python:3.11-slim)
#   docker build --target cuda -t zeroc:cuda .     FROM $CUDA_BASE_IMAGE  (an NVIDIA CUDA runtime image)
#
# The image runs as an unprivileged user, holds the bundled model under /models (ZEROC_MODEL_DIR points
# there; mount a volume over /models to serve others) and its entry point is `zeroc`, so a container's
# command is a zeroc command: `serve prefill`, `serve decode`, `serve gateway`, `health`...
# BuildKit builds only the stages the target needs; cpu is the last stage, so it is the default.

ARG BASE_IMAGE=python:3.11-slim
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
# Where the cpu target fetches torch when deploy/docker/local/ holds no torch wheel: PyTorch's CPU-only
# builds (PyPI's Linux torch is the multi-GB CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The project's sources, which both build stages install.
FROM scratch AS src
COPY pyproject.toml setup.py README.md /src/
COPY zeroc /src/zeroc
COPY kernels /src/kernels
COPY prefill_service /src/prefill_service
COPY decode_service /src/decode_service
COPY kv_store /src/kv_store

# ---- CUDA: PyPI's torch (CUDA, NCCL) and the project's gpu extra (Triton, NCCL) ----
FROM ${CUDA_BASE_IMAGE} AS cuda-build
ARG TORCH_VERSION
COPY deploy/docker/setup.sh /usr/local/bin/zeroc-setup
RUN zeroc-setup os build
COPY deploy/docker/local /local
RUN TORCH_VERSION=${TORCH_VERSION} zeroc-setup torch cuda
COPY --from=src /src /src
RUN zeroc-setup project cuda

FROM ${CUDA_BASE_IMAGE} AS cuda
COPY deploy/docker/setup.sh /usr/local/bin/zeroc-setup
RUN zeroc-setup os runtime && zeroc-setup user
ENV ZEROC_DEVICE=cuda
COPY --from=cuda-build /opt/zeroc /opt/zeroc
COPY --chown=zeroc:zeroc models /models
ENV PATH=/opt/zeroc/bin:$PATH PYTHONUNBUFFERED=1 ZEROC_MODEL_DIR=/models/zeroc-tiny
USER zeroc
WORKDIR /home/zeroc
ENTRYPOINT ["zeroc"]
CMD ["--help"]

# ---- CPU: a CPU-only torch ----
FROM ${BASE_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
COPY deploy/docker/setup.sh /usr/local/bin/zeroc-setup
RUN zeroc-setup os build
COPY deploy/docker/local /local
RUN TORCH_VERSION=${TORCH_VERSION} TORCH_INDEX_URL=${TORCH_INDEX_URL} zeroc-setup torch cpu
COPY --from=src /src /src
RUN zeroc-setup project cpu

FROM ${BASE_IMAGE} AS cpu
COPY deploy/docker/setup.sh /usr/local/bin/zeroc-setup
RUN zeroc-setup os runtime && zeroc-setup user
ENV ZEROC_DEVICE=cpu ZEROC_KERNEL_DIR=/opt/zeroc/kernels
COPY --from=cpu-build /opt/zeroc /opt/zeroc
COPY --chown=zeroc:zeroc models /models
ENV PATH=/opt/zeroc/bin:$PATH PYTHONUNBUFFERED=1 ZEROC_MODEL_DIR=/models/zeroc-tiny
USER zeroc
WORKDIR /home/zeroc
ENTRYPOINT ["zeroc"]
CMD ["--help"]
