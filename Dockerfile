# syntax=docker/dockerfile:1
# nextword serving image: the torch-free base install (FastAPI + onnxruntime) and models/.
#
#   docker build -t nextword .
#   docker run -p 8000:8000 nextword

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# Only what the serving install needs: no training/ package, no torch.
COPY pyproject.toml ./
COPY nextword/ nextword/
COPY service/ service/
RUN /opt/venv/bin/pip install . \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NEXTWORD_HOST=0.0.0.0 \
    NEXTWORD_PORT=8000 \
    NEXTWORD_MODEL_REPOSITORY=/app/models \
    NEXTWORD_LOG_FORMAT=json
RUN groupadd --system --gid 10001 nextword \
    && useradd --system --uid 10001 --gid nextword --no-create-home --home-dir /app nextword
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=nextword:nextword models/ /app/models/
USER nextword
EXPOSE 8000
# Ready = a model is loaded (/readyz answers 200; urlopen raises on 503). No curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('NEXTWORD_PORT', '8000'), timeout=2)" || exit 1
CMD ["nextword-serve"]
