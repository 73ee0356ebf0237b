# fetcher: the init container that puts a verified model next to its serving container.
#
#   docker build -t ghcr.io/example/fetcher:0.1.0 .
#   docker run --rm --read-only --user 65532:65532 -v "$PWD/models:/models" \
#     -e FETCHER_SOURCE=https://models.example.com/sentiment-v3.tar.gz -e FETCHER_SHA256=9f2c...e1 \
#     -e FETCHER_DEST=/models ghcr.io/example/fetcher:0.1.0
#
# Both stages start from the same image, so the venv's interpreter link (/opt/venv/bin/python) points at a
# Python that exists in the runtime stage. Swap it with --build-arg PYTHON_IMAGE=...; keep a current patch
# release: the tarfile extraction-filter fixes of 2025 (CVE-2025-4517 and friends) are checked for below.
ARG PYTHON_IMAGE=python:3.13-slim

# --- build: a venv holding fetcher and its dependencies, nothing else -------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# os.path.ALLOW_MISSING arrived with the fix for the tarfile filter bypasses (3.9.23, 3.10.18, 3.11.13,
# 3.12.11, 3.13.4, 3.14): its absence means a Python that fetcher should not unpack archives with.
RUN python3 -c "import os.path, sys; hasattr(os.path, 'ALLOW_MISSING') or sys.exit('PYTHON_IMAGE lacks the 2025 tarfile security fixes: use a current patch release')" \
 && python3 -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY fetcher /src/fetcher
# Then drop what fetcher never loads: pip itself; botocore's models of ~440 AWS services other than S3 and
# the credential chain's (STS for IRSA, SSO, sign-in), ~27 MB; zstandard's second, CFFI build, ~12 MB;
# the test suites that some packages ship.
WORKDIR /opt/venv/lib
RUN /opt/venv/bin/python -m pip install --no-cache-dir /src \
 && /opt/venv/bin/python -m pip uninstall --yes pip \
 && find python3*/site-packages/botocore/data -mindepth 1 -maxdepth 1 -type d \
      ! -name s3 ! -name sts ! -name sso ! -name sso-oidc ! -name signin -exec rm -rf {} + \
 && rm -f python3*/site-packages/zstandard/_cffi.*.so python3*/site-packages/zstandard/backend_cffi.py \
 && find python3*/site-packages -mindepth 2 -maxdepth 2 -type d -name tests -exec rm -rf {} + \
 && /opt/venv/bin/fetcher --version \
 && /opt/venv/bin/python -c "import boto3, zstandard; boto3.client('s3', region_name='us-east-1'); boto3.client('sts', region_name='us-east-1'); print('zstd', zstandard.backend)"

# --- runtime: the base image plus the venv; no compilers, no pip cache, no sources, no tests ---------------
FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="fetcher" \
      org.opencontainers.image.description="Init container that fetches a model over HTTP(S), S3 or a file, verifies its SHA-256, unpacks it safely and publishes it." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/fetcher" \
      org.opencontainers.image.documentation="https://github.com/example/fetcher#readme" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
COPY --from=build /opt/venv /opt/venv
# Nothing is written outside the destination volume: no bytecode, no home directory, no temp files.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so the kubelet can check runAsNonRoot without a passwd entry.
USER 65532:65532
ENTRYPOINT ["fetcher"]
