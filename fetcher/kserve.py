"""KServe's and Seldon's storage-initializer contract: the environment they give it, as fetcher's settings.

KServe's webhook runs the storage initializer in an init container named ``storage-initializer``
with ``SRC DEST [SRC DEST ...]`` as its arguments (the pairs are read in ``config``), in an
environment built from the storage Secret or the service account's Secrets
(pkg/webhook/admission/pod/storage_initializer_injector.go; the S3 names in
pkg/credentials/s3/utils.go ``BuildS3EnvVars``, HF_TOKEN in pkg/credentials/hf/hf_secret.go,
``<host>-headers`` in pkg/credentials/https/https_secret.go, STORAGE_CONFIG and
STORAGE_OVERRIDE_CONFIG in pkg/credentials/service_account_credentials.go
``CreateStorageSpecSecretEnvs``). Seldon Core v1 runs its model initializer the same way, with
``[srcURI, /mnt/models]`` and the AWS_* names from an envFrom Secret
(operator/controllers/model_initializer_injector.go). KServe's own initializer reads that
environment in python/storage/kserve_storage/kserve_storage.py (``Storage``); ``read`` reads it the
same way, once, and says what it means for fetcher:

- option values (``Contract.values``): a layer of their own, above the config file and below
  ``FETCHER_*`` and flags, which always win. Each is parsed by config's parser and named by the
  variable it came from;
- variables for boto3 (``Contract.environment``), set in the process environment before any source
  opens. boto3 itself reads AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
  AWS_DEFAULT_REGION and AWS_CA_BUNDLE, as fetcher's S3 source already relies on, and KServe's
  initializer sets them in its own environment from STORAGE_CONFIG for the same reason
  (``_update_with_storage_spec``): fetcher options for them would only repeat boto3's, and hold keys;
- the names, never the values, of KServe settings fetcher does not support, for one warning.

The global CA bundle (CA_BUNDLE_CONFIGMAP_NAME) is trusted for HTTPS by ``fast_http.tls_context``
through ``global_ca_bundle``, besides the usual CAs, as KServe combines it with them
(``_configure_global_ca_bundle``); for S3 it is AWS_CA_BUNDLE, as KServe's S3 client takes it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fetcher.errors import UsageError

# pkg/constants/constants.go DefaultCaBundleVolumeMountPath; the file name is kserve_storage.py's.
DEFAULT_CA_MOUNT = "/etc/ssl/custom-certs"
CA_FILE = "cabundle.crt"

# STORAGE_CONFIG's fields for type s3, and the variable each one sets (_update_with_storage_spec).
_SPEC_S3 = (
    ("endpoint_url", "AWS_ENDPOINT_URL"),
    ("access_key_id", "AWS_ACCESS_KEY_ID"),
    ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    ("region", "AWS_DEFAULT_REGION"),
    ("ca_bundle", "AWS_CA_BUNDLE"),
    ("verify_ssl", "S3_VERIFY_SSL"),
    ("anonymous", "awsAnonymousCredential"),
)
# Fields the webhook reads (to build the URI and mount a CA), not the initializer.
_SPEC_WEBHOOK = ("type", "bucket", "cabundle_configmap")
_BOTO3 = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE")

# Every variable that takes effect here or in a source (HF_TOKEN and HF_ENDPOINT: sources/hub.py).
_HONOURED = (
    *_BOTO3,
    "S3_ENDPOINT",
    "S3_USE_HTTPS",
    "S3_VERIFY_SSL",
    "awsAnonymousCredential",
    "S3_USER_VIRTUAL_BUCKET",
    "STORAGE_CONFIG",
    "STORAGE_OVERRIDE_CONFIG",
    "STORAGE_ALLOW_PATTERNS",
    "STORAGE_IGNORE_PATTERNS",
    "CA_BUNDLE_CONFIGMAP_NAME",
    "CA_BUNDLE_VOLUME_MOUNT_POINT",
    "VERIFICATION_DIGEST",
    "HF_TOKEN",
    "HF_ENDPOINT",
)
# kserve_storage.py's own tuning of its S3 client, which fetcher's options cover in their own terms.
_TUNING = {
    "S3_CONNECT_TIMEOUT": "FETCHER_TIMEOUT",
    "S3_READ_TIMEOUT": "FETCHER_TIMEOUT",
    "S3_MAX_ATTEMPTS": "FETCHER_RETRIES",
    "S3_MAX_FILE_CONCURRENCY": "FETCHER_CONCURRENCY",
}
# Switches fetcher has no counterpart for: named when switched on. S3 transfer acceleration
# (get_S3_config); decrypting the model after the download (initializer-entrypoint).
_SWITCHES = ("S3_USE_ACCELERATE", "CONFIDENTIAL_ENABLED")
# Not named at all: the webhook adds HF_HUB_ENABLE_HF_TRANSFER, HF_XET_HIGH_PERFORMANCE and
# HF_XET_NUM_CONCURRENT_RANGE_GETS to every storage initializer (pkg/utils/storage.go
# AddDefaultHuggingFaceEnvVars): huggingface_hub's speed switches, and fetcher's transfer is always
# parallel. AWS_CA_BUNDLE_CONFIGMAP is the webhook's: it mounts that ConfigMap and says so in
# CA_BUNDLE_CONFIGMAP_NAME. Credentials of schemes fetcher does not take (GCS, Azure, HDFS) come
# with the service account whatever the URI: a pod whose URI needs them never reaches fetcher.

# The names boto3 and huggingface_hub read in any pod: a pod is KServe's when it sets a name of
# KServe's own, or all three of the defaults the webhook adds to every storage initializer (above;
# users set one or two of them for huggingface_hub too).
_SHARED = (*_BOTO3, "HF_TOKEN", "HF_ENDPOINT")
_KSERVE_OWN = frozenset((*_HONOURED, *_TUNING, *_SWITCHES)) - frozenset(_SHARED)
_WEBHOOK_DEFAULTS = ("HF_HUB_ENABLE_HF_TRANSFER", "HF_XET_HIGH_PERFORMANCE", "HF_XET_NUM_CONCURRENT_RANGE_GETS")

_HEADERS_SUFFIX = "-headers"  # <host>-headers: a JSON object of headers for that host's http(s) URIs
_PLAIN = re.compile(r"[A-Za-z0-9_.-]{1,40}")


@dataclass(frozen=True)
class Contract:
    """What KServe's environment means for fetcher."""

    values: dict[str, Any] = field(default_factory=dict)  # option name -> raw value, parsed by config
    origins: dict[str, str] = field(default_factory=dict)  # option name -> the variable it came from
    environment: dict[str, str | None] = field(default_factory=dict)  # for boto3; None: unset
    honoured: tuple[str, ...] = ()  # names of the variables that took effect
    unsupported: tuple[str, ...] = ()  # names (with what to use instead) of those that cannot
    missing_ca: str | None = None  # the global CA bundle's path, configured but not there
    host_headers: dict[str, str] = field(default_factory=dict)  # variable -> its JSON text
    kserve_own: bool = False  # a variable only KServe sets is there: this is a KServe pod

    def headers_for(self, source: str | None) -> tuple[str, Any] | None:
        """(variable, headers) that KServe sends to an http(s) source's host (``_download_from_uri``)."""
        if not self.host_headers or not source or source.split("://", 1)[0].lower() not in ("http", "https"):
            return None
        name = f"{urlsplit(source).hostname}{_HEADERS_SUFFIX}"
        if (text := self.host_headers.get(name)) is None:
            return None
        try:
            headers = json.loads(text)
        except ValueError:
            headers = None
        if not isinstance(headers, dict) or not all(isinstance(v, (str, int, float)) for v in headers.values()):
            raise UsageError(f"{name}: expected a JSON object of header names and values")  # never the text
        return name, headers

    def export(self, environ: MutableMapping[str, str]) -> None:
        """Set what boto3 reads in the process environment (``os.environ``)."""
        for name, value in self.environment.items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value


def read(environ: Mapping[str, str]) -> Contract:
    """KServe's environment, read as its initializer reads it; the values are left for config to parse."""
    spec, overridden = _storage_spec(environ)
    env = {name: environ[name] for name in (*_HONOURED, *_TUNING, *_SWITCHES) if name in environ}
    via: dict[str, str] = {}  # a variable STORAGE_CONFIG set -> which of the two set it
    if spec.get("type") == "s3":
        for key, variable in _SPEC_S3:
            if key in spec:
                env[variable] = spec[key]
                via[variable] = "STORAGE_OVERRIDE_CONFIG" if key in overridden else "STORAGE_CONFIG"
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}

    def take(option: str, value: Any, variable: str) -> None:
        values[option], origins[option] = value, via.get(variable, variable)

    endpoint = env.get("AWS_ENDPOINT_URL") or None
    if endpoint is None and (host := env.get("S3_ENDPOINT", "").strip()):
        # The webhook gives both (getEndpointConfiguration); S3_ENDPOINT alone is a host whose
        # scheme S3_USE_HTTPS says: "0" is http, anything else https.
        endpoint = host if "://" in host else ("http://" if env.get("S3_USE_HTTPS") == "0" else "https://") + host
        env["AWS_ENDPOINT_URL"] = endpoint
    bundle = _configured_bundle(environ)
    # _get_s3_client_kwargs: "0" and "false" turn verification off; then there is no CA to trust
    if env.get("S3_VERIFY_SSL", "").lower() in ("0", "false"):
        take("s3_no_verify_ssl", "true", "S3_VERIFY_SSL")
    elif not env.get("AWS_CA_BUNDLE") and bundle is not None:
        env["AWS_CA_BUNDLE"] = bundle  # KServe's S3 client verifies against the global bundle alone
    if env.get("awsAnonymousCredential", "").lower() == "true":  # get_S3_config
        take("s3_anonymous", "true", "awsAnonymousCredential")
    region = env.get("AWS_DEFAULT_REGION") or None
    if env.get("S3_USER_VIRTUAL_BUCKET", "").lower() == "true":
        take("s3_addressing_style", "virtual", "S3_USER_VIRTUAL_BUCKET")
    elif endpoint == "https://s3.amazonaws.com" and region not in (None, "us-east-1"):
        # get_S3_config: the legacy global endpoint answers another region's path-style request with
        # a PermanentRedirect; virtual-hosted style lets S3 route it
        take("s3_addressing_style", "virtual", "AWS_ENDPOINT_URL")
    for variable, option in (("STORAGE_ALLOW_PATTERNS", "include"), ("STORAGE_IGNORE_PATTERNS", "exclude")):
        if patterns := parse_patterns(environ.get(variable, "")):
            take(option, patterns, variable)
    if digest := environ.get("VERIFICATION_DIGEST", "").strip():  # KServe PR #6051: "sha256:<hex>"
        take("sha256", digest, "VERIFICATION_DIGEST")
    return Contract(
        values=values,
        origins=origins,
        environment={name: env.get(name) or None for name in _BOTO3 if env.get(name) != environ.get(name)},
        honoured=tuple(name for name in _HONOURED if environ.get(name)),
        unsupported=tuple(_unsupported(environ, spec)),
        missing_ca=bundle if bundle is not None and not os.path.exists(bundle) else None,
        host_headers={name: text for name, text in environ.items() if name.endswith(_HEADERS_SUFFIX)},
        kserve_own=any(
            value and (name in _KSERVE_OWN or name.endswith(_HEADERS_SUFFIX)) for name, value in environ.items()
        )
        or all(name in environ for name in _WEBHOOK_DEFAULTS),
    )


def parse_patterns(text: str) -> list[str]:
    """STORAGE_ALLOW_PATTERNS and STORAGE_IGNORE_PATTERNS: a JSON list, else comma-separated
    (kserve_storage.py ``_parse_patterns_from_env``)."""
    text = text.strip()
    if not text:
        return []
    try:
        parsed = json.loads(text)
    except ValueError:
        return [p.strip() for p in text.split(",") if p.strip()]
    items = parsed if isinstance(parsed, list) else [parsed]
    return [str(p).strip() for p in items if str(p).strip()]


def global_ca_bundle(environ: Mapping[str, str]) -> str | None:
    """The CA bundle the webhook mounted from CA_BUNDLE_CONFIGMAP_NAME, if it is there: trusted for
    HTTPS besides the usual CAs. Missing, it is no error (``read`` has it warned), as in KServe."""
    bundle = _configured_bundle(environ)
    return bundle if bundle is not None and os.path.exists(bundle) else None


def _configured_bundle(environ: Mapping[str, str]) -> str | None:
    if not environ.get("CA_BUNDLE_CONFIGMAP_NAME"):
        return None
    return os.path.join(environ.get("CA_BUNDLE_VOLUME_MOUNT_POINT") or DEFAULT_CA_MOUNT, CA_FILE)


def _storage_spec(environ: Mapping[str, str]) -> tuple[dict[str, str], set[str]]:
    """STORAGE_CONFIG with STORAGE_OVERRIDE_CONFIG's fields over it, each field as text (as
    _update_with_storage_spec merges them), and the fields the override gave."""
    override = _spec(environ, "STORAGE_OVERRIDE_CONFIG")
    return _spec(environ, "STORAGE_CONFIG") | override, set(override)


def _spec(environ: Mapping[str, str], name: str) -> dict[str, str]:
    text = environ.get(name, "").strip()
    if not text:
        return {}
    try:
        spec = json.loads(text)
    except ValueError as exc:  # its text holds keys: only where it broke is said
        at = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise UsageError(f"{name}: not valid JSON{at}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{name}: expected a JSON object such as KServe's storage Secret holds")
    fields: dict[str, str] = {}
    for key, value in spec.items():
        if isinstance(value, bool):  # the Secret holds strings; a hand-written true is meant the same
            value = "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            shown = key if _PLAIN.fullmatch(key) else "(a field)"
            raise UsageError(f"{name}: the field {shown} must be a string")
        fields[key] = str(value)
    return fields


def _unsupported(environ: Mapping[str, str], spec: Mapping[str, str]) -> list[str]:
    names = [f"{name} (use {instead})" for name, instead in _TUNING.items() if environ.get(name)]
    names += [name for name in _SWITCHES if environ.get(name, "").lower() == "true"]
    kind = spec.get("type", "")
    if spec and kind != "s3":  # hdfs and webhdfs: their URIs are not fetcher's either
        shown = repr(kind) if _PLAIN.fullmatch(kind) else "(not shown)"
        names.append(f"STORAGE_CONFIG of type {shown}" if kind else "STORAGE_CONFIG without a type")
    elif spec:
        known = {key for key, _ in _SPEC_S3} | set(_SPEC_WEBHOOK)
        names += [f"STORAGE_CONFIG field {k if _PLAIN.fullmatch(k) else '(not shown)'}" for k in spec if k not in known]
    return names
