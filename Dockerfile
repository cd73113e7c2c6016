# syntax=docker/dockerfile:1
# One image for the three services: `openlora store | router | worker | init-model ...`.
#
# Base: the official PyTorch CUDA *runtime* image. Workers need CUDA, torch and triton,
# which it ships matched to each other; the store and the router need none of it but
# run from the same image anyway: one build, one tag, one set of dependencies to patch,
# and `docker compose build` builds once. The price is size (several GB) for the two
# CPU-only services; docs/deploy.md says how to build a slim CPU image instead.
#
# flash-attn (prefill attention on GPU; PyTorch SDPA is the fallback) needs nvcc to
# build, so it is built as a wheel in a stage on the matching *devel* image and only
# the wheel reaches the runtime image. `--build-arg WITH_FLASH_ATTN=0` skips it.
ARG PYTORCH_TAG=2.5.1-cuda12.4-cudnn9

FROM pytorch/pytorch:${PYTORCH_TAG}-devel AS flash-attn
ARG WITH_FLASH_ATTN=1
ARG FLASH_ATTN_VERSION=2.7.4.post1
# the build takes a lot of memory per job: raise on a big builder
ARG MAX_JOBS=4
RUN mkdir -p /wheels && if [ "$WITH_FLASH_ATTN" = "1" ]; then \
      pip install --no-cache-dir ninja packaging && \
      MAX_JOBS="$MAX_JOBS" pip wheel --no-cache-dir --no-build-isolation --no-deps \
        "flash-attn==${FLASH_ATTN_VERSION}" -w /wheels; \
    fi

FROM pytorch/pytorch:${PYTORCH_TAG}-runtime
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/openlora/.cache/huggingface

WORKDIR /opt/openlora
COPY pyproject.toml README* ./
COPY protos protos
COPY services services
COPY kernels kernels
COPY adapter_store adapter_store
COPY router router
COPY inference_worker inference_worker
# torch is already in the base image: pyproject lists it unpinned, so pip keeps it
RUN --mount=type=bind,from=flash-attn,source=/wheels,target=/wheels \
    pip install ".[postgres,otlp,gpu]" $(find /wheels -name '*.whl')

# Non-root. The volume mount points exist and belong to the user, so a fresh named
# volume mounted there starts writable by it.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin openlora \
    && mkdir -p /data/store /data/kernel-cache /models \
    && chown -R openlora:openlora /data /models
# Triton's compiled kernels: a worker compiles its kernel variants at start (all of them the
# first time); with this dir on a volume (compose.yaml, deploy/k8s) a restart loads them instead
ENV TRITON_CACHE_DIR=/data/kernel-cache
USER 10001:10001
WORKDIR /home/openlora

# Ports by convention: router 50051, store 50052, worker 50053, Prometheus /metrics 9464.
EXPOSE 50051 50052 50053 9464
# compose.yaml sets its own healthcheck per service; this default fits `docker run`
# of any of them when OPENLORA_HEALTH_ADDR names the service's address.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD python -m services.healthcheck "${OPENLORA_HEALTH_ADDR:-127.0.0.1:50051}"
ENTRYPOINT ["openlora"]
CMD ["--help"]
