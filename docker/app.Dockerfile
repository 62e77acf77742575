# The web app (FastAPI + Gradio), the one-shot migration and `celery beat`: no GPU, no
# model. Slim Python 3.11, CPU torch (the project depends on torch; the app never runs it).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INFINI_DATA_DIR=/var/lib/infini \
    INFINI_BLOB_DIR=/var/lib/infini/blobs

# CPU torch first and explicitly: a bare `torch` requirement would pull the CUDA build
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/infini
COPY pyproject.toml README.md ./
COPY infini_core ./infini_core
COPY storage ./storage
COPY workers ./workers
COPY app ./app
# postgres: the psycopg driver; s3: boto3 for the S3 blob store (INFINI_BLOB_BACKEND=s3)
RUN pip install ".[postgres,s3]"

# non-root; the same uid as the worker image, so both can write the shared blob volume
RUN groupadd --system --gid 10001 infini \
 && useradd --system --uid 10001 --gid infini --home-dir /home/infini --create-home infini \
 && mkdir -p /var/lib/infini/blobs \
 && chown -R infini:infini /var/lib/infini
USER infini
WORKDIR /home/infini

EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/healthz', timeout=4)" || exit 1

CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "7860", "--no-worker"]
