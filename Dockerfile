FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams streams
COPY models models
COPY producers producers
COPY consumers consumers
COPY xrec xrec
RUN pip install --no-cache-dir .
RUN useradd --create-home xrec
USER xrec
WORKDIR /home/xrec
CMD ["xrec", "worker"]
