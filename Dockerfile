# syntax=docker/dockerfile:1
#
# mcsr BIDS App image: Python 3.11 + PyPI's torch 2.13.0 (the Linux x86_64 wheel carries
# CUDA 13.0: NVIDIA driver >= 580, GPUs of compute capability >= 7.5) + the mcsr package.
#
#   docker build --build-arg VERSION="$(cat version)" -t bids/mcsr:"$(cat version)" .
#
# CPU-only variant (about 2 GB; the CUDA build adds several GB of NVIDIA libraries):
#   docker build --build-arg VERSION="$(cat version)" \
#       --build-arg TORCH_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu -t bids/mcsr:cpu .
#
# tests/test_container.py replays this file's COPY and `pip install` RUN steps in a fresh
# virtual environment, so keep those steps in plain RUN lines whose paths are relative to
# WORKDIR. Layers are ordered from rarely to often changing; the build args that change on
# every release (VERSION, VCS_REF, BUILD_DATE) are declared last so that they do not
# invalidate the multi-GB torch layer.
FROM python:3.11.14-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# Empty: PyPI's CUDA build. Another PyTorch index that holds a 2.13.0 build (cpu, cu126, ...)
# wins over PyPI because its local version label (+cpu, +cu126) sorts higher.
ARG TORCH_EXTRA_INDEX_URL=""
RUN PIP_EXTRA_INDEX_URL="${TORCH_EXTRA_INDEX_URL}" python -m pip install torch==2.13.0

# Third-party dependencies come from pyproject.toml, the list the tests and `make venv` use;
# installing them before the package source keeps this layer cached across code changes.
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > requirements.txt \
    && python -m pip install -r requirements.txt \
    && rm requirements.txt

# TemplateFlow files for --output-space, fetched now so that runtime never downloads.
# Read-only at run time: TemplateFlow must not try to update its skeleton either.
ENV TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0
COPY docker/fetch_templates.py docker/
RUN python docker/fetch_templates.py

# The package itself, as a regular (non-editable) install; `pip check` fails the build on any
# dependency the package declares but the layers above did not provide.
COPY README.md version ./
COPY bids_mcsr ./bids_mcsr
RUN python -m pip install --no-deps . \
    && python -m pip check \
    && rm -rf build bids_mcsr.egg-info

# Run as any uid (`docker run -u`, Apptainer) on a read-only root with only /tmp writable:
# every cache and config directory lives under /tmp.
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/.config/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"

ARG VERSION
RUN test "${VERSION}" = "$(cat version)" \
    || { echo "build with --build-arg VERSION=$(cat version) (got '${VERSION}')" >&2; exit 1; }

ARG IMAGE=bids/mcsr
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="mcsr" \
      org.opencontainers.image.description="BIDS App: subject-specific multi-contrast MRI super-resolution with implicit neural representations" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/mcsr-bids/mcsr" \
      org.opencontainers.image.url="https://hub.docker.com/r/${IMAGE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"
# Written into the derivatives' dataset_description.json (GeneratedBy.Container).
ENV MCSR_CONTAINER="docker://${IMAGE}:${VERSION}"

WORKDIR /tmp
ENTRYPOINT ["mcsr"]
CMD ["--help"]
