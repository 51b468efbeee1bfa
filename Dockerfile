#
# tfb-serve image. One Dockerfile, the variants chosen by build args:
#
#   GPU (default):  docker build -t tfb-serve .
#   CPU:            docker build -t tfb-serve:cpu --build-arg BASE_IMAGE=debian:bookworm-slim \
#                       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg EXTRAS= .
#   Ray Serve:      docker build -t tfb-serve:ray --build-arg EXTRAS="cuda ray" .
#
# Plain Dockerfile syntax (no `# syntax=` line, no RUN --mount): the classic builder, BuildKit and
# docker-compose 1.29 build it without pulling a frontend image. Without a registry, make the base
# with scripts/docker_base.sh; behind a proxy that re-signs TLS, put its CA in deploy/docker/ca/;
# wheels in deploy/docker/wheels/ are preferred to the index (the CPU torch wheel, an air-gapped
# build). Both stay in the builder stage. scripts/docker_smoke.sh builds and checks it all.
#
# The GPU base is nvidia/cuda's *base* flavour, at the CUDA major of the locked torch (13): the
# torch wheel brings its own CUDA runtime, cuBLAS and cuDNN, so the -runtime/-cudnn images would
# only ship them twice. Any Debian/Ubuntu base with python3 >= 3.10 works (requirements.lock is
# universal): the CPU image uses Debian bookworm (python3.11).

ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS builder

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Extra CA certificates (*.crt, *.pem) are added to the system bundle for pip in this stage only;
# local wheels become pip's find-links. The runtime stage copies neither.
COPY deploy/docker/ /opt/build/
RUN { cat /etc/ssl/certs/ca-certificates.crt; \
      find /opt/build/ca -type f \( -name '*.crt' -o -name '*.pem' \) -exec cat {} +; } > /opt/build/ca-bundle.pem

# PIP_INDEX_URL: a PyPI mirror (devpi, Artifactory...) where pypi.org is not reachable.
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_INDEX_URL=${PIP_INDEX_URL} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CERT=/opt/build/ca-bundle.pem \
    PIP_FIND_LINKS=/opt/build/wheels \
    PIP_DEFAULT_TIMEOUT=120
RUN python3 -m venv "$VIRTUAL_ENV"

# Every version comes from requirements.lock (scripts/lock.sh: generated from pyproject.toml).
# torch first, from the index the variant needs (PyPI's Linux wheel is the CUDA build; the CPU
# index, or a CPU wheel in deploy/docker/wheels, saves ~3 GB), so the dependency layer below finds
# it satisfied and never swaps it: the lock's `torch==X` matches both X and X+cpu.
ARG TORCH_INDEX_URL=https://pypi.org/simple
WORKDIR /src
COPY requirements.lock ./
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url "${PIP_INDEX_URL}" -c requirements.lock torch \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Dependencies of pyproject.toml, pinned by the lock: this layer is rebuilt only when they change,
# not on every source edit. EXTRAS names optional-dependency groups (space separated).
ARG EXTRAS=cuda
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
opt = p.get('optional-dependencies', {}); \
deps = list(p['dependencies']) + [d for g in sys.argv[1:] for d in opt[g]]; \
open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" ${EXTRAS} \
    && pip install -c requirements.lock -r /tmp/requirements.txt \
    && pip check

# The package itself, from the repository (not editable, no dependency resolution: done above).
COPY README.md ./
COPY tfb_core ./tfb_core
COPY app ./app
RUN pip install --no-deps . && tfb --help > /dev/null


FROM ${BASE_IMAGE} AS runtime

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin tfb \
    && mkdir -p /data/hf /data/tfb /opt/tfb-serve/ray \
    && chown -R tfb:tfb /data

COPY --from=builder /opt/venv /opt/venv
# The Ray Serve entry module (import path serve_app:app); harmless in the plain image.
COPY deploy/ray/serve_app.py /opt/tfb-serve/ray/serve_app.py

# HF_HOME holds the hub cache (model weights: ~16 GB for an 8B model); TFB_CACHE_DIR the converted
# embedded model and the sigma-search results. Both are volumes so a restart reuses them.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/tfb-serve/ray \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf \
    TFB_CACHE_DIR=/data/tfb \
    TFB_HOST=0.0.0.0 \
    TFB_PORT=8000 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

VOLUME ["/data/hf", "/data/tfb"]
USER 10001:10001
WORKDIR /home/tfb
EXPOSE 8000

# /readyz turns 200 only once the model is loaded and sigma is known. An 8B model may first be
# downloaded (~16 GB) and its sigma searched on the anchor set: hence the long start period.
# Failures inside it do not count; the first success ends it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20m --retries=4 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('TFB_PORT', '8000'), timeout=4)"]

# tini reaps children (pip fetching the embedded model) and forwards SIGTERM for a graceful drain.
ENTRYPOINT ["tini", "--", "tfb", "serve"]
