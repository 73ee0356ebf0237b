"""fetcher as KServe's and Seldon Core's storage initializer: ``fetcher SRC DEST [SRC DEST ...]``, in
the environment their webhooks give it, against real servers (moto's S3, the fake hub, the HTTP origin).

The environments are written as KServe's webhook writes them (kserve/kserve):
- S3: pkg/credentials/s3/s3_secret.go ``BuildSecretEnvs`` and pkg/credentials/s3/utils.go
  ``BuildS3EnvVars``, from a Secret's data and ``serving.kserve.io/s3-*`` annotations;
- every storage initializer gets pkg/utils/storage.go ``AddDefaultHuggingFaceEnvVars``;
- the global CA bundle: CA_BUNDLE_CONFIGMAP_NAME and CA_BUNDLE_VOLUME_MOUNT_POINT,
  pkg/webhook/admission/pod/storage_initializer_injector.go;
- a storage spec: STORAGE_CONFIG (the storage Secret's key) and STORAGE_OVERRIDE_CONFIG (the
  InferenceService's storage parameters), pkg/credentials/service_account_credentials.go;
- ``<host>-headers``: pkg/credentials/https/https_secret.go; HF_TOKEN: pkg/credentials/hf/hf_secret.go;
- VERIFICATION_DIGEST: "sha256:<hex>", KServe PR #6051 (pkg/utils/verification.go).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import certifi
import pytest

from fetcher import kserve
from fetcher.config import build_parser, resolve
from fetcher.errors import UsageError
from tests.conftest import S3, Origin, Run, Tls, make_tar, published, run_fetcher, sha256, tree
from tests.fakehub import FakeHub
from tests.faults_support import S3Front

ACCESS_KEY = "AKIAKSERVE0EXAMPLE00"
SECRET_KEY = "kServeSecretKey/K7MDENG/bPxRfiCY0EXAMPLE"
FILES = {
    "config.json": b'{"architectures": ["BertForSequenceClassification"]}\n',
    "tokenizer.json": b'{"model": {"vocab": {"good": 0}}}\n',
    "model.safetensors": random.Random(14).randbytes(200_000),
    "README.md": b"# sentiment\n",
}


def webhook_s3_env(
    endpoint: str,
    *,
    use_https: str | None = None,
    verify_ssl: str | None = None,
    anonymous: str | None = None,
    region: str | None = "us-east-1",
    virtual: str | None = None,
    ca_bundle: str | None = None,
) -> dict[str, str]:
    """The storage initializer's env for an S3 Secret, in BuildS3EnvVars' order: the keys from the Secret's
    awsAccessKeyID/awsSecretAccessKey, then each s3-* annotation given; and the HF defaults every one gets."""
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    # getEndpointConfiguration: a scheme in the endpoint decides S3_USE_HTTPS, else the annotation does
    if endpoint.startswith("https://"):
        use_https, endpoint = "1", endpoint[8:]
    elif endpoint.startswith("http://"):
        use_https, endpoint = "0", endpoint[7:]
    if use_https:
        env["S3_USE_HTTPS"] = use_https
    env["S3_ENDPOINT"] = endpoint
    env["AWS_ENDPOINT_URL"] = ("http://" if use_https == "0" else "https://") + endpoint
    for name, value in (
        ("S3_VERIFY_SSL", verify_ssl),
        ("awsAnonymousCredential", anonymous),
        ("AWS_DEFAULT_REGION", region),
        ("S3_USER_VIRTUAL_BUCKET", virtual),
        ("AWS_CA_BUNDLE", ca_bundle),
    ):
        if value is not None:
            env[name] = value
    return env | HF_DEFAULTS


NO_SHA256 = "no sha256 given: the download will not be verified"
HF_DEFAULTS = {
    "HF_HUB_ENABLE_HF_TRANSFER": "1",
    "HF_XET_HIGH_PERFORMANCE": "1",
    "HF_XET_NUM_CONCURRENT_RANGE_GETS": "8",
}


def _prefix(s3: S3, bucket: str, files: dict[str, bytes] = FILES) -> str:
    for name, body in files.items():
        s3.put(bucket, f"models/sentiment/{name}", body)
    s3.put(bucket, "models/sentiment-old/config.json", b"{}")  # a sibling folder KServe's prefix match pulled in
    return f"s3://{bucket}/models/sentiment"


def _host(endpoint: str) -> str:
    return endpoint.split("://", 1)[1]


def _outputs(run: Run, *paths: Path) -> str:
    """Everything fetcher wrote that a person may read: its output, the termination log, markers."""
    text = run.stdout + run.stderr
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*.json") if ".fetcher" in p.parts]
        text += "".join(p.read_text(errors="replace") for p in files)
    return text


def _no_warning_but(run: Run, *events: str) -> None:
    """No warning but these (and those of an unverified download) and nothing on stderr outside the log."""
    unverified = (NO_SHA256, "files not verified")
    warnings = [e["event"] for e in run.events if e.get("level") == "warning" and e["event"] not in unverified]
    assert warnings == list(events), run.stderr
    assert not run.all("(not json)"), run.stderr  # nothing on stderr outside the log (urllib3's warnings)


# --- the invocation: SRC DEST pairs ------------------------------------------------------------


def test_src_dest_is_source_and_dest(origin: Origin, tmp_path: Path) -> None:
    archive = make_tar({"model/w.bin": b"weights"})
    url = origin.add("/sentiment.tgz", archive)
    dest = tmp_path / "mnt" / "models"
    run = run_fetcher(url, str(dest))
    assert run.code == 0, run.stderr
    assert tree(dest) == {"model/w.bin": b"weights"}  # a .tgz unpacked into DEST, as KServe leaves it
    assert run.event("start")["artifacts"] == 1
    again = run_fetcher(url, str(dest))
    assert again.code == 0 and again.all("already present")
    assert len(origin.hits("/sentiment.tgz")) == 1  # a restart downloads nothing


def test_two_pairs_are_two_artifacts_and_flags_apply_to_each(origin: Origin, tmp_path: Path) -> None:
    """KServe's storageUris with supportsMultiModelDownload: [uri, path] per model, mounts under one parent."""
    first = origin.add("/a/model.bin", b"first")
    second = origin.add("/b/model.bin", b"second")
    models = tmp_path / "mnt" / "models"
    run = run_fetcher("--file-mode", "0600", first, str(models / "a"), second, str(models / "b"))
    assert run.code == 0, run.stderr
    assert (tree(models / "a"), tree(models / "b")) == ({"model.bin": b"first"}, {"model.bin": b"second"})
    assert {oct((models / n / "model.bin").stat().st_mode & 0o777) for n in "ab"} == {"0o600"}
    assert run.event("done")["artifacts"] == 2


def test_flags_may_come_between_and_after_the_pairs(origin: Origin, tmp_path: Path) -> None:
    """As a hand-written Pod's args put them: argparse alone took them for unrecognized arguments."""
    first = origin.add("/a/model.bin", b"first")
    second = origin.add("/b/model.bin", b"second")
    models = tmp_path / "models"
    run = run_fetcher(first, str(models / "a"), "--file-mode", "0600", second, str(models / "b"), "--retries", "1")
    assert run.code == 0, run.stderr
    assert (tree(models / "a"), tree(models / "b")) == ({"model.bin": b"first"}, {"model.bin": b"second"})
    assert {oct((models / n / "model.bin").stat().st_mode & 0o777) for n in "ab"} == {"0o600"}


def test_a_double_dash_still_ends_the_options(tmp_path: Path) -> None:
    (tmp_path / "m.bin").write_bytes(b"m")
    run = run_fetcher("--dry-run", "--", str(tmp_path / "m.bin"), "-dest")
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout)["artifacts"][0]["dest"] == "-dest"
    taken = run_fetcher("--", "--retries", "3")  # a SRC, not an option: and no scheme
    assert taken.code == 2 and "no source given" not in taken.error, taken.error


@pytest.mark.fault("an odd number of SRC DEST arguments: exit 2, one line, no value repeated", exit=2, area="config")
def test_an_odd_number_of_arguments_is_a_usage_error(tmp_path: Path) -> None:
    secret_url = "https://user:pa55-KSERVE@h/m.bin"
    termination = tmp_path / "termination-log"
    run = run_fetcher(secret_url, str(tmp_path / "a"), "s3://b/k", "--termination-log", str(termination))
    assert run.code == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert run.error == "expected SRC DEST pairs, got an odd number of arguments (3 values, not shown)"
    assert termination.read_text() == run.error + "\n"
    assert "pa55-KSERVE" not in run.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.fault("SRC DEST pairs with --config, --source or FETCHER_DEST: exit 2, one line", exit=2, area="config")
@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--config", "{config}"], {}, "--config / FETCHER_CONFIG cannot be combined with SRC DEST arguments"),
        ([], {"FETCHER_CONFIG": "{config}"}, "--config / FETCHER_CONFIG cannot be combined with SRC DEST"),
        (["--source", "http://h/m"], {}, "--source / FETCHER_SOURCE cannot be combined with SRC DEST arguments"),
        ([], {"FETCHER_DEST": "/tmp/elsewhere"}, "--dest / FETCHER_DEST cannot be combined with SRC DEST"),
    ],
    ids=["--config", "FETCHER_CONFIG", "--source", "FETCHER_DEST"],
)
def test_pairs_are_not_combined_with_another_way_of_naming_artifacts(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    config = tmp_path / "fetcher.yaml"
    config.write_text("artifacts:\n  - source: http://h/other\n    dest: /tmp/other\n")
    fill = {"{config}": str(config)}
    run = run_fetcher(*[fill.get(a, a) for a in args], "http://h/m.bin", str(tmp_path / "d"),
                      env={k: fill.get(v, v) for k, v in env.items()})  # fmt: skip
    assert run.code == 2, run.stderr
    assert run.error.startswith(says) and run.error.endswith("(2 values, not shown)")
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_scheme_fetcher_does_not_take_names_the_argument(tmp_path: Path) -> None:
    """gs://, Azure and hdfs:// keep KServe's own container: the ClusterStorageContainer is chosen per prefix."""
    run = run_fetcher("https://h/a.bin", str(tmp_path / "a"), "gs://bucket/model", str(tmp_path / "b"))
    assert run.code == 2
    assert run.error.startswith("SRC (argument 3): unsupported URL scheme 'gs'")


def test_an_unknown_option_takes_the_pairs_as_its_values(tmp_path: Path) -> None:
    run = run_fetcher("--bogus", "s3cr3t-value", str(tmp_path / "d"))
    assert run.code == 2
    assert run.error == "unrecognized arguments: --bogus, 2 values not shown"


@pytest.mark.parametrize("value", ["user:hunter2@example", "it's:hunter2"])  # argparse quotes the 2nd in "
def test_a_switch_given_a_value_does_not_repeat_it(tmp_path: Path, value: str) -> None:
    termination = tmp_path / "termination-log"
    run = run_fetcher("https://h/m.bin", str(tmp_path / "d"), f"--dry-run={value}",
                      "--termination-log", str(termination))  # fmt: skip
    assert run.code == 2
    assert run.error == "argument --dry-run: ignored explicit argument (not shown): a switch takes none"
    assert "hunter2" not in run.stdout + run.stderr + termination.read_text()  # argparse quoted it back


@pytest.mark.parametrize("slash", ["", "/"])
def test_a_bare_absolute_path_is_a_folder_source_as_seldon_passes_a_pvc(tmp_path: Path, slash: str) -> None:
    """Seldon Core v1 mounts pvc://claim/models/x at /mnt/pvc and passes /mnt/pvc/models/x as SRC."""
    pvc = tmp_path / "mnt" / "pvc" / "models" / "x"
    pvc.mkdir(parents=True)
    for name, body in FILES.items():
        (pvc / name).write_bytes(body)
    dest = tmp_path / "mnt" / "models"
    run = run_fetcher(str(pvc) + slash, str(dest))
    assert run.code == 0, run.stderr
    assert tree(dest) == FILES
    assert run.event("plan")["source"] == f"file://{pvc}{slash}"


def test_a_bare_absolute_path_to_a_file_is_a_file_source(tmp_path: Path) -> None:
    odd = tmp_path / "a dir%20with #odd ?names"
    odd.mkdir()
    (odd / "model.tar.gz").write_bytes(make_tar({"w.bin": b"w"}))
    run = run_fetcher(str(odd / "model.tar.gz"), str(tmp_path / "d"))
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "d") == {"w.bin": b"w"}


# --- S3, with the env KServe's webhook writes ---------------------------------------------------


def test_an_s3_prefix_with_the_env_the_webhook_writes(s3: S3, tmp_path: Path) -> None:
    """Secret annotations serving.kserve.io/s3-endpoint: 127.0.0.1:PORT and s3-usehttps: "0"."""
    source = _prefix(s3, "kserve-prefix")
    env = webhook_s3_env(_host(s3.endpoint), use_https="0")
    dest = tmp_path / "mnt" / "models"
    run = run_fetcher(source, str(dest), env=env)
    assert run.code == 0, run.stderr
    assert tree(dest) == FILES  # the prefix as a directory: sentiment-old/ is not pulled in
    assert set(run.event("KServe settings read")["names"]) == {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "S3_ENDPOINT", "S3_USE_HTTPS",
        "AWS_DEFAULT_REGION",
    }  # fmt: skip
    _no_warning_but(run)  # the HF defaults are no unsupported setting
    assert SECRET_KEY not in _outputs(run, dest)


def test_s3_endpoint_alone_takes_its_scheme_from_s3_use_https(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    source = s3.put("kserve-endpoint", "m.bin", b"m")
    env = webhook_s3_env(_host(s3_front.endpoint), use_https="0")
    del env["AWS_ENDPOINT_URL"]  # as a hand-written Secret for envFrom may give it
    run = run_fetcher(source, str(tmp_path / "d"), env=env)
    assert run.code == 0, run.stderr
    assert len(s3_front.gets()) == 1


def test_aws_endpoint_url_wins_over_s3_endpoint(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    source = s3.put("kserve-endpoint", "w.bin", b"w")
    env = webhook_s3_env("127.0.0.1:9", use_https="0") | {"AWS_ENDPOINT_URL": s3_front.endpoint}
    run = run_fetcher(source, str(tmp_path / "d"), env=env)
    assert run.code == 0, run.stderr
    assert len(s3_front.gets()) == 1


def test_s3_endpoint_without_s3_use_https_is_https(s3: S3, s3_tls: S3Front, tls: Tls, tmp_path: Path) -> None:
    source = s3.put("kserve-https", "m.bin", b"m")
    env = webhook_s3_env(_host(s3_tls.endpoint), ca_bundle=str(tls.ca_file))
    del env["AWS_ENDPOINT_URL"]
    run = run_fetcher(source, str(tmp_path / "d"), env=env)
    assert run.code == 0, run.stderr
    assert len(s3_tls.gets()) == 1


@pytest.mark.parametrize("value", ["0", "false", "False"])
def test_s3_verify_ssl_off_trusts_a_self_signed_endpoint(s3: S3, s3_tls: S3Front, tmp_path: Path, value: str) -> None:
    source = s3.put("kserve-verify", "m.bin", b"m")
    env = webhook_s3_env(s3_tls.endpoint, verify_ssl=value)
    run = run_fetcher(source, str(tmp_path / "d"), env=env)
    assert run.code == 0, run.stderr
    _no_warning_but(run)  # and no InsecureRequestWarning on stderr
    checked = run_fetcher(source, str(tmp_path / "e"), env=env | {"FETCHER_S3_NO_VERIFY_SSL": "false"})
    assert checked.code == 3 and "not trusted" in checked.error  # FETCHER_* wins


def test_s3_verify_ssl_on_still_verifies(s3: S3, s3_tls: S3Front, tmp_path: Path) -> None:
    source = s3.put("kserve-verify", "n.bin", b"n")
    run = run_fetcher(source, str(tmp_path / "d"), env=webhook_s3_env(s3_tls.endpoint, verify_ssl="1"))
    assert run.code == 3 and "not trusted" in run.error


def test_the_global_ca_bundle_is_trusted_for_s3_and_https(
    s3: S3, s3_tls: S3Front, tls: Tls, tls_origin: Origin, tmp_path: Path
) -> None:
    """caBundleConfigMapName: the webhook mounts the ConfigMap, whose cabundle.crt is the CA to trust."""
    mount = tmp_path / "custom-certs"
    mount.mkdir()
    shutil.copy(tls.ca_file, mount / "cabundle.crt")
    ca = {"CA_BUNDLE_CONFIGMAP_NAME": "kserve-ca-bundle", "CA_BUNDLE_VOLUME_MOUNT_POINT": str(mount)}
    source = s3.put("kserve-ca", "m.bin", b"m")
    run = run_fetcher(source, str(tmp_path / "s3"), env=webhook_s3_env(s3_tls.endpoint) | ca)
    assert run.code == 0, run.stderr
    url = tls_origin.add("/m.bin", b"https")
    # besides the CAs already trusted (here SSL_CERT_FILE's), not instead of them
    other = {"SSL_CERT_FILE": certifi.where()}
    run = run_fetcher(url, str(tmp_path / "https"), env=ca | other)
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "https") == {"m.bin": b"https"}
    without = run_fetcher(url, str(tmp_path / "no-ca"), env=other)
    assert without.code == 3 and "not trusted" in without.error


def test_a_global_ca_bundle_that_is_not_there_is_one_warning(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/m.bin", b"m")
    env = {"CA_BUNDLE_CONFIGMAP_NAME": "kserve-ca-bundle", "CA_BUNDLE_VOLUME_MOUNT_POINT": str(tmp_path / "none")}
    run = run_fetcher(url, str(tmp_path / "d"), env=env)
    assert run.code == 0, run.stderr
    _no_warning_but(run, "CA bundle not found: trusting the default CAs")
    assert run.event("CA bundle not found: trusting the default CAs")["path"] == str(tmp_path / "none/cabundle.crt")


def test_anonymous_credentials_send_unsigned_requests(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    source = s3.put("kserve-anon", "m.bin", b"m")
    s3.client.put_object_acl(Bucket="kserve-anon", Key="m.bin", ACL="public-read")  # moto refuses unsigned otherwise
    env = webhook_s3_env(s3_front.endpoint, anonymous="true")
    run = run_fetcher(source, str(tmp_path / "d"), env=env)
    assert run.code == 0, run.stderr
    assert [r for r in s3_front.requests if "Authorization" in r.headers] == []
    signed = run_fetcher(source, str(tmp_path / "e"), env=env | {"FETCHER_S3_ANONYMOUS": "false"})
    assert signed.code == 0, signed.stderr
    assert [r for r in s3_front.requests if ACCESS_KEY in r.headers.get("Authorization", "")]


def test_storage_config_with_its_override(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    """A storage spec: the Secret's key holds STORAGE_CONFIG; the InferenceService's parameters are
    STORAGE_OVERRIDE_CONFIG, whose fields win; both win over the plain variables."""
    source = _prefix(s3, "kserve-spec")
    secret = "specSecretKey/ONLY-IN-STORAGE-CONFIG"
    storage_config = {
        "type": "s3",
        "access_key_id": "AKIASTORAGECONFIG000",
        "secret_access_key": secret,
        "endpoint_url": "http://127.0.0.1:9",  # overridden below
        "region": "us-east-1",
        "bucket": "kserve-spec",
    }
    override = {"type": "s3", "bucket": "kserve-spec", "endpoint_url": s3_front.endpoint}
    env = webhook_s3_env("127.0.0.1:9", use_https="0") | {
        "STORAGE_CONFIG": json.dumps(storage_config),
        "STORAGE_OVERRIDE_CONFIG": json.dumps(override),
    }
    dest = tmp_path / "d"
    run = run_fetcher(source, str(dest), env=env)
    assert run.code == 0, run.stderr
    assert tree(dest) == FILES
    assert all("Credential=AKIASTORAGECONFIG000/" in r.headers["Authorization"] for r in s3_front.requests)
    _no_warning_but(run)
    for leaked in (secret, SECRET_KEY):
        assert leaked not in _outputs(run, dest)


@pytest.mark.fault(
    "STORAGE_CONFIG that is not JSON: exit 2 at once, saying where, never its text", exit=2, area="secrets"
)
def test_storage_config_that_is_not_json_is_a_usage_error_without_its_text(tmp_path: Path) -> None:
    env = {"STORAGE_CONFIG": '{"type": "s3", "secret_access_key": "sp3cS3cret", oops}'}
    termination = tmp_path / "termination-log"
    run = run_fetcher("s3://b/k", str(tmp_path / "d"), "--termination-log", str(termination), env=env)
    assert run.code == 2
    assert run.error == "STORAGE_CONFIG: not valid JSON at line 1, column 51"
    assert "sp3cS3cret" not in run.stderr + termination.read_text()


# --- Hugging Face ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("STORAGE_ALLOW_PATTERNS", '["*.json", "README.md"]', {"config.json", "tokenizer.json", "README.md"}),
        ("STORAGE_ALLOW_PATTERNS", "tokenizer.json, config.json", {"config.json", "tokenizer.json"}),
        (
            "STORAGE_IGNORE_PATTERNS",
            '["*.safetensors"]',
            {"config.json", "tokenizer.json", "README.md", ".gitattributes"},
        ),
        ("STORAGE_IGNORE_PATTERNS", "*.safetensors,README.md,.gitattributes", {"config.json", "tokenizer.json"}),
    ],
    ids=["allow-json", "allow-commas", "ignore-json", "ignore-commas"],
)
def test_patterns_as_kserve_reads_them(
    hub: FakeHub, tmp_path: Path, variable: str, value: str, expected: set[str]
) -> None:
    hub.add_repo("org/sentiment", FILES)
    dest = tmp_path / "d"
    run = run_fetcher("hf://org/sentiment", str(dest), env={"HF_ENDPOINT": hub.endpoint, variable: value} | HF_DEFAULTS)
    assert run.code == 0, run.stderr
    assert set(tree(dest)) == expected


def test_the_llm_controllers_tokenizer_only_download(hub: FakeHub, tmp_path: Path) -> None:
    """pkg/controller/v1alpha2/llmisvc/workload_storage.go tokenizerOnlyDownload, verbatim."""
    allow = '["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "config.json", "generation_config.json"]'  # noqa: E501
    hub.add_repo("org/llm", FILES | {"generation_config.json": b"{}"})
    run = run_fetcher(
        "hf://org/llm", str(tmp_path / "d"), env={"HF_ENDPOINT": hub.endpoint, "STORAGE_ALLOW_PATTERNS": allow}
    )
    assert run.code == 0, run.stderr
    assert set(tree(tmp_path / "d")) == {"config.json", "tokenizer.json", "generation_config.json"}


def test_fetcher_include_wins_over_storage_allow_patterns(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/sentiment", FILES)
    env = {"HF_ENDPOINT": hub.endpoint, "STORAGE_ALLOW_PATTERNS": "*.json", "FETCHER_INCLUDE": "README.md"}
    run = run_fetcher("hf://org/sentiment", str(tmp_path / "d"), env=env)
    assert run.code == 0, run.stderr
    assert set(tree(tmp_path / "d")) == {"README.md"}


def test_patterns_leave_a_single_object_alone_as_in_kserve(origin: Origin, s3: S3, tmp_path: Path) -> None:
    url = origin.add("/model.bin", b"one file")
    run = run_fetcher(url, str(tmp_path / "d"), env={"STORAGE_ALLOW_PATTERNS": '["*.json"]'})
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "d") == {"model.bin": b"one file"}
    # an S3 key is found to be one object only when it is resolved
    source = s3.put("kserve-one", "model.tar.gz", make_tar({"w.bin": b"w"}))
    env = webhook_s3_env(s3.endpoint) | {"STORAGE_IGNORE_PATTERNS": "*.bin"}
    run = run_fetcher(source, str(tmp_path / "s3"), env=env)
    assert run.code == 0, run.stderr
    assert tree(tmp_path / "s3") == {"w.bin": b"w"}
    mine = run_fetcher(url, str(tmp_path / "e"), "--include", "*.json")
    assert mine.code == 2 and "--include/--exclude applies to a directory" in mine.error  # fetcher's own: a mistake


def test_hf_token_from_the_storage_secret(tmp_path: Path) -> None:
    token = "hf_kserveSecretToken0123456789"
    hub = FakeHub(token=token)
    try:
        hub.add_repo("org/private", FILES, private=True)
        dest = tmp_path / "d"
        env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": token} | HF_DEFAULTS  # the webhook adds those to every pod
        run = run_fetcher("hf://org/private", str(dest), env=env)
        assert run.code == 0, run.stderr
        assert tree(dest)["config.json"] == FILES["config.json"]
        assert "HF_TOKEN" in run.event("KServe settings read")["names"]
        assert token not in _outputs(run, dest)
    finally:
        hub.close()


def test_outside_kserve_the_shared_names_are_not_called_kserve_settings(tmp_path: Path) -> None:
    """AWS_* and HF_* are boto3's and huggingface_hub's names in any pod: a pod with no variable of
    KServe's own is not told it was read as KServe's."""
    model = tmp_path / "m.bin"
    model.write_bytes(b"m")
    env = {"HF_TOKEN": "hf_notKServe0123456789", "AWS_DEFAULT_REGION": "eu-west-1"}
    run = run_fetcher(f"file://{model}", str(tmp_path / "d"), env=env)
    assert run.code == 0, run.stderr
    assert [e for e in run.events if e["event"] == "KServe settings read"] == []
    assert set(run.event("environment settings read")["names"]) == {"HF_TOKEN", "AWS_DEFAULT_REGION"}


# --- https with KServe's <host>-headers -------------------------------------------------------------


def test_host_headers_from_the_https_secret(origin: Origin, tmp_path: Path) -> None:
    token = "Bearer kserveHeaderT0ken"
    url = origin.add("/private/model.bin", b"private", require={"Authorization": token})
    headers = {"127.0.0.1-headers": json.dumps({"Authorization": token, "X-Team": "ml"})}
    plan = run_fetcher("--dry-run", url, str(tmp_path / "d"), env=headers)
    assert json.loads(plan.stdout)["artifacts"][0]["headers"] == ["Authorization: ***", "X-Team: ***"]
    run = run_fetcher(url, str(tmp_path / "d"), env=headers)
    assert run.code == 0, run.stderr
    assert origin.hits("/private/model.bin")[0].headers["X-Team"] == "ml"
    assert "127.0.0.1-headers" in run.event("KServe settings read")["names"]  # the variable that took effect
    other = run_fetcher(url, str(tmp_path / "e"), env=headers | {"FETCHER_HEADERS": "X-Team: other"})
    assert other.code == 3  # FETCHER_HEADERS wins, whole
    for output in (plan, run, other):
        assert "kserveHeaderT0ken" not in _outputs(output)


@pytest.mark.fault(
    "a <host>-headers that is not a JSON object: exit 2, its text never repeated", exit=2, area="secrets"
)
def test_host_headers_that_are_not_json_are_a_usage_error(tmp_path: Path) -> None:
    run = run_fetcher("https://models.example.com/m.bin", str(tmp_path / "d"),
                      env={"models.example.com-headers": "Authorization: Bearer n0tJs0nT0ken"})  # fmt: skip
    assert run.code == 2
    assert run.error == "models.example.com-headers: expected a JSON object of header names and values"
    assert "n0tJs0nT0ken" not in run.stderr
    other_host = run_fetcher("--dry-run", "https://h/m.bin", str(tmp_path / "d"), env={"x-headers": "not json"})
    assert other_host.code == 0  # another host's headers are not this source's


# --- VERIFICATION_DIGEST (KServe PR #6051) ------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["sha256:", ""])
def test_verification_digest_pins_the_artifact(origin: Origin, tmp_path: Path, prefix: str) -> None:
    archive = make_tar({"model/w.bin": b"weights"})
    url = origin.add("/m.tgz", archive)
    run = run_fetcher(url, str(tmp_path / "d"), env={"VERIFICATION_DIGEST": prefix + sha256(archive)})
    assert run.code == 0, run.stderr
    assert run.event("plan")["sha256"] == sha256(archive)
    assert run.all(NO_SHA256) == []


@pytest.mark.fault("VERIFICATION_DIGEST that does not match: exit 4, nothing published", exit=4, area="config")
def test_a_verification_digest_mismatch_publishes_nothing(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/m.tgz", make_tar({"model/w.bin": b"weights"}))
    dest = tmp_path / "mnt" / "models"
    dest.mkdir(parents=True)  # the emptyDir the webhook mounts
    run = run_fetcher(url, str(dest), env={"VERIFICATION_DIGEST": "sha256:" + "0" * 64})
    assert run.code == 4, run.stderr
    assert "sha256" in run.error and "0" * 64 in run.error
    assert published(dest) == [] and list(dest.iterdir()) == []
    right = run_fetcher(url, str(dest), env={"VERIFICATION_DIGEST": "sha256:" + "0" * 64,
                                             "FETCHER_SHA256": sha256(origin.routes["/m.tgz"].body)})  # fmt: skip
    assert right.code == 0, right.stderr  # FETCHER_SHA256 wins


@pytest.mark.fault("VERIFICATION_DIGEST with two SRC DEST pairs, or a directory: exit 2", exit=2, area="config")
def test_a_verification_digest_names_one_file(hub: FakeHub, tmp_path: Path) -> None:
    digest = {"VERIFICATION_DIGEST": "sha256:" + "a" * 64}
    two = run_fetcher("http://h/a", str(tmp_path / "a"), "http://h/b", str(tmp_path / "b"), env=digest)
    assert two.code == 2
    assert two.error == "VERIFICATION_DIGEST pins one artifact: it cannot be combined with 2 SRC DEST pairs"
    hub.add_repo("org/sentiment", FILES)
    directory = run_fetcher("hf://org/sentiment", str(tmp_path / "d"), env=digest | {"HF_ENDPOINT": hub.endpoint})
    assert directory.code == 2
    assert directory.error.startswith("VERIFICATION_DIGEST verifies one file or archive, but hf://org/sentiment is a")
    bad = run_fetcher("http://h/a", str(tmp_path / "a"), env={"VERIFICATION_DIGEST": "sha256:abc"})
    assert bad.code == 2 and bad.error == "VERIFICATION_DIGEST: expected 64 hex digits, got 3 characters"


# --- what fetcher does not support, and secrets ---------------------------------------------------


@pytest.mark.fault(
    "KServe settings fetcher does not support: one warning naming them, never a value", exit=0, area="config"
)
def test_unsupported_settings_are_named_in_one_warning(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("/m.bin", b"m")
    env = HF_DEFAULTS | {
        "S3_USE_ACCELERATE": "true",
        "S3_MAX_ATTEMPTS": "7",
        "CONFIDENTIAL_ENABLED": "true",
        "AWS_CA_BUNDLE_CONFIGMAP": "s3-ca",  # the webhook's own: no warning
        "S3_USER_VIRTUAL_BUCKET": "false",
        "STORAGE_CONFIG": json.dumps({"type": "s3", "bucket": "b", "session_token": "t0kenNotShown"}),
    }
    run = run_fetcher(url, str(tmp_path / "d"), env=env)
    assert run.code == 0, run.stderr
    [warning] = run.all("KServe settings not supported, ignored")
    assert warning["names"] == [
        "S3_MAX_ATTEMPTS (use FETCHER_RETRIES)",
        "S3_USE_ACCELERATE",
        "CONFIDENTIAL_ENABLED",
        "STORAGE_CONFIG field session_token",
    ]
    _no_warning_but(run, "KServe settings not supported, ignored")
    assert "t0kenNotShown" not in run.stderr


@pytest.mark.fault("KServe's credentials never reach the log, the plan, the marker or the termination log",
                   exit=3, area="secrets")  # fmt: skip
def test_kserve_secrets_stay_out_of_every_output(s3: S3, s3_front: S3Front, tmp_path: Path) -> None:
    source = _prefix(s3, "kserve-secrets")
    spec_secret = "specS3cr3t/zzzzzzzzzzzzzzzz"
    env = webhook_s3_env(s3_front.endpoint) | {
        "STORAGE_CONFIG": json.dumps({"type": "s3", "secret_access_key": spec_secret, "access_key_id": ACCESS_KEY}),
        "HF_TOKEN": "hf_tokenNeverShown000000",
    }
    secrets = (SECRET_KEY, spec_secret, "hf_tokenNeverShown000000")
    dest = tmp_path / "d"
    plan = run_fetcher("--dry-run", "--log-level", "debug", source, str(dest), env=env)
    run = run_fetcher("--log-level", "debug", source, str(dest), env=env)
    termination = tmp_path / "termination-log"
    failed = run_fetcher(source + "-absent/x.bin", str(tmp_path / "e"), "--termination-log", str(termination), env=env)
    assert (plan.code, run.code, failed.code) == (0, 0, 3), run.stderr
    for output in (_outputs(plan), _outputs(run, dest), _outputs(failed, termination)):
        for secret in secrets:
            assert secret not in output


# --- the mapping, layer by layer (config.resolve, no network) -----------------------------------------


def _resolved(env: dict[str, str], *args: str) -> dict[str, object]:
    config = resolve(build_parser().parse_args([*args, "s3://b/k", "/mnt/models"]), env)
    [artifact] = config.artifacts
    return artifact


def test_virtual_bucket_addressing() -> None:
    artifact = _resolved(webhook_s3_env("minio.example.com", virtual="true"))
    assert artifact["s3_addressing_style"] == "virtual"
    assert artifact["from_kserve"] == {"s3_addressing_style": "S3_USER_VIRTUAL_BUCKET"}
    flagged = _resolved(webhook_s3_env("minio.example.com", virtual="true"), "--s3-addressing-style", "path")
    assert flagged["s3_addressing_style"] == "path" and flagged["from_kserve"] == {}  # a flag wins
    # kserve_storage.py get_S3_config: the legacy global endpoint outside us-east-1 is virtual-hosted
    legacy = _resolved(webhook_s3_env("https://s3.amazonaws.com", region="eu-west-1"))
    assert legacy["s3_addressing_style"] == "virtual"
    assert _resolved(webhook_s3_env("https://s3.amazonaws.com"))["s3_addressing_style"] == "auto"


def test_what_boto3_reads_is_exported_and_named_by_its_origin() -> None:
    env = webhook_s3_env("minio:9000", use_https="0") | {
        "STORAGE_CONFIG": json.dumps({"type": "s3", "region": "eu-west-1", "verify_ssl": "0", "anonymous": "True"}),
        "STORAGE_OVERRIDE_CONFIG": json.dumps({"type": "s3", "endpoint_url": "https://override:9000"}),
        "CA_BUNDLE_CONFIGMAP_NAME": "ca",
    }
    contract = kserve.read(env)
    assert contract.environment == {"AWS_ENDPOINT_URL": "https://override:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    assert contract.origins == {"s3_no_verify_ssl": "STORAGE_CONFIG", "s3_anonymous": "STORAGE_CONFIG"}
    verified = kserve.read(webhook_s3_env("minio:9000") | {"CA_BUNDLE_CONFIGMAP_NAME": "ca"})
    assert verified.environment == {"AWS_CA_BUNDLE": "/etc/ssl/custom-certs/cabundle.crt"}  # the webhook's default
    own = kserve.read(webhook_s3_env("minio:9000", ca_bundle="/certs/mine.pem") | {"CA_BUNDLE_CONFIGMAP_NAME": "ca"})
    assert own.environment == {}  # AWS_CA_BUNDLE given: KServe's S3 client takes it first


@pytest.mark.parametrize(
    ("text", "patterns"),
    [
        ('["*.safetensors", " *.json "]', ["*.safetensors", "*.json"]),
        ("*.safetensors, *.json,,", ["*.safetensors", "*.json"]),
        ('"*.json"', ["*.json"]),
        ("[broken", ["[broken"]),
        ("  ", []),
        ("[]", []),
    ],
)
def test_patterns_parse_as_kserve_parses_them(text: str, patterns: list[str]) -> None:
    """kserve_storage.py _parse_patterns_from_env: a JSON list, a JSON scalar, else comma-separated."""
    assert kserve.parse_patterns(text) == patterns


def test_storage_config_shapes() -> None:
    """As the webhook writes it (strings), as a person might (true), and what no Secret holds."""
    assert kserve.read({"STORAGE_CONFIG": '{"type": "s3", "anonymous": true}'}).values == {"s3_anonymous": "true"}
    emptied = kserve.read({"AWS_ENDPOINT_URL": "http://a", "STORAGE_CONFIG": '{"type": "s3", "endpoint_url": ""}'})
    assert emptied.environment == {"AWS_ENDPOINT_URL": None}
    environ = {"AWS_ENDPOINT_URL": "http://a"}
    emptied.export(environ)
    assert environ == {}
    assert kserve.read({"STORAGE_CONFIG": '{"type": "hdfs"}'}).unsupported == ("STORAGE_CONFIG of type 'hdfs'",)
    assert kserve.read({"STORAGE_CONFIG": '{"bucket": "b"}'}).unsupported == ("STORAGE_CONFIG without a type",)
    for text, says in (
        ('["s3"]', "STORAGE_CONFIG: expected a JSON object such as KServe's storage Secret holds"),
        ('{"type": "s3", "region": {"name": "x"}}', "STORAGE_CONFIG: the field region must be a string"),
    ):
        with pytest.raises(UsageError) as refused:
            kserve.read({"STORAGE_CONFIG": text})
        assert str(refused.value) == says
