"""Config values: every key refuses a wrong type and a wrong value by name, and what the
runtime (the store, the metadata client, botocore, Popen) would refuse is refused at load."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_config import BASE, refusal, with_key

from daemon import config
from daemon.config import ConfigError

# --- every key: a wrong type and a wrong value, each named in the message ---------------

# A value of the wrong type for each kind of key (the parser's first word in the message).
WRONG_TYPE: dict[str, tuple[object, str]] = {
    "run.id": (7, "expected a string"),
    "run.command": ("python train.py", "expected a non-empty list of strings"),
    "run.workdir": (["/a"], "expected a string"),
    "run.env": (["A=1"], "expected a table of string values"),
    "run.user": (1000, "expected a string"),
    "run.nodes": ("2", "expected an integer"),
    "run.node_id": (7, "expected a string"),
    "run.group": (["video"], "expected a string"),
    "checkpoints.local_dir": (1, "expected a string"),
    "checkpoints.remote": (True, "expected a string"),
    "checkpoints.keep_remote": ("3", "expected an integer"),
    "s3.endpoint_url": (9000, "expected a string"),
    "s3.region": (1, "expected a string"),
    "s3.part_size_mb": (6.5, "expected an integer"),
    "s3.max_concurrency": ("8", "expected an integer"),
    "s3.checksum_algorithm": (32, "expected a string"),
    "imds.url": (None, "expected a string"),
    "imds.poll_interval": ("1s", "expected a number"),
    "imds.token_ttl": (1.5, "expected an integer"),
    "imds.provider": (1, "expected a string"),
    "azure.approve_after_commit": ("yes", "expected a boolean"),
    "azure.account_url": (443, "expected a string"),
    "daemon.runtime_dir": (0, "expected a string"),
    "daemon.stop_budget": ("90", "expected a number"),
    "daemon.safety_margin": ([], "expected a number"),
    "daemon.rescan_interval": (True, "expected a number"),
    "daemon.max_restarts": (2.0, "expected an integer"),
    "daemon.restart_window": ("10m", "expected a number"),
    "daemon.progress_timeout": ("1h", "expected a number"),
    "daemon.lease_ttl": ("30s", "expected a number"),
    "daemon.exit_code_after_notice": ("75", "expected an integer"),
    "metrics.textfile": (1, "expected a string"),
}

WRONG_VALUE: dict[str, tuple[object, str]] = {
    "run.id": ("has space", "must match"),
    "run.command": ([], "expected a non-empty list"),
    "run.workdir": ("relative/dir", "must be an absolute path"),
    "run.env": ({"A": 1}, "expected a table of string values"),
    "run.user": ("", "must not be empty"),
    "run.nodes": (0, "must be between 1 and 1024"),
    "run.node_id": ("i-0/../x", "must match"),
    "run.group": ("a:b", "is not a user or group name"),
    "checkpoints.local_dir": ("ckpt", "must be an absolute path"),
    "checkpoints.remote": ("ftp://bucket", "must look like s3://bucket"),
    "checkpoints.keep_remote": (0, "must be between 1 and 1000"),
    "s3.endpoint_url": ("ftp://x", "must be an http:// or https:// URL"),
    "s3.region": ("  ", "must not be empty"),
    "s3.part_size_mb": (1, "must be between 5 and 5120"),
    "s3.max_concurrency": (0, "must be between 1 and 64"),
    "s3.checksum_algorithm": ("MD5", "must be one of SHA256, CRC32, CRC32C, none"),
    "imds.url": ("169.254.169.254", "is not http://host[:port]"),
    "imds.poll_interval": (0, "must be between"),
    "imds.token_ttl": (21601, "must be between 1 and 21600"),
    "imds.provider": ("oracle", "must be one of aws, gcp, azure"),
    "azure.approve_after_commit": (1, "expected a boolean"),
    "azure.account_url": ("http://acct.blob.core.windows.net", "must be https://"),
    "daemon.runtime_dir": ("run", "must be an absolute path"),
    "daemon.stop_budget": (0, "must be between"),
    "daemon.safety_margin": (-1, "must be between"),
    "daemon.rescan_interval": (float("inf"), "must be between"),
    "daemon.max_restarts": (-1, "must be between 0 and 1000"),
    "daemon.restart_window": (0.5, "must be between"),
    "daemon.progress_timeout": (-1, "must be between"),
    "daemon.lease_ttl": (1, "must be between 3 and 3600"),
    "daemon.exit_code_after_notice": (256, "must be between 0 and 255"),
    "metrics.textfile": ("/var/lib/node_exporter/spot.txt", "must end in .prom"),
}


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, keys in config.SCHEMA.items() for k in keys]


def test_every_key_has_a_bad_type_and_a_bad_value_case() -> None:
    # A new key must come with its error cases.
    assert sorted(WRONG_TYPE) == sorted(all_keys())
    assert sorted(WRONG_VALUE) == sorted(all_keys())


@pytest.mark.parametrize("key", sorted(WRONG_TYPE))
def test_wrong_type_is_named(key: str) -> None:
    value, words = WRONG_TYPE[key]
    with pytest.raises(ConfigError) as exc:
        config.build(with_key(key, value))
    assert str(exc.value).startswith(f"{key}: ") and words in str(exc.value)


@pytest.mark.parametrize("key", sorted(WRONG_VALUE))
def test_wrong_value_is_named(key: str) -> None:
    value, words = WRONG_VALUE[key]
    with pytest.raises(ConfigError) as exc:
        config.build(with_key(key, value))
    assert str(exc.value).startswith(f"{key}: ") and words in str(exc.value)


@pytest.mark.parametrize("value", ["CRC32", "crc32", "SHA256", "none", "None"])
def test_checksum_algorithm_values(value: str) -> None:
    cfg = config.build(with_key("s3.checksum_algorithm", value))
    assert cfg.s3.checksum_algorithm == ("none" if value.lower() == "none" else value.upper())
    assert config.build(BASE).s3.checksum_algorithm == "CRC32"  # the default


def test_checksum_algorithm_crc32c_without_awscrt_names_the_key() -> None:
    from botocore.compat import HAS_CRT

    if HAS_CRT:
        assert config.build(with_key("s3.checksum_algorithm", "CRC32C")).s3.checksum_algorithm
        return
    with pytest.raises(ConfigError) as exc:
        config.build(with_key("s3.checksum_algorithm", "CRC32C"))
    assert str(exc.value).startswith("s3.checksum_algorithm: CRC32C needs awscrt")


# --- what the runtime would refuse is refused at load time ------------------------------


def accepted_by(parse: Callable[[str], object], value: str) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return True


REMOTES = [
    "s3://bkt", "s3://bkt/", "s3://bkt/p", "s3://bkt/a/b/", "s3://bkt//p", "s3://Legacy_Bkt/p",
    "s3://bkt/a//b", "s3://bkt/p?versionId=1", "s3://bkt/p#x", "s3://bkt/a b", "s3://bkt/p\t",
    "s3://b/p", "s3://bk", "s3:///p", "s3://-bkt/p", "gs://bkt/p", "S3://bkt/p",
    "gs://bkt", "gs://my.bucket/a/b", "gs://Bkt/p", "gs://bk", "gs://bkt-/p", "gs://bkt//p",
    "gs://bkt/a//b", "gs://" + "a" * 64, "gs://" + "a" * 60 + ".b", "az://ctr/p", "az://ctr",
    "az://Ctr/p", "az://c--tr/p", "az://ctr-/p", "az://ct", "az://ctr/a b", "az://ctr/p?x",
    "gs:///p", "az://" + "c" * 64,
]  # fmt: skip


@pytest.mark.parametrize(
    "remote",
    ["s3://bkt/a//b", "s3://bkt/p?versionId=1", "s3://bkt/p#x", "s3://bkt/a b", "s3://b/p"],
)
def test_remote_the_store_would_refuse_is_refused_at_load(remote: str) -> None:
    message = refusal("checkpoints.remote", remote)
    assert message is not None and message.startswith("checkpoints.remote: ")


@pytest.mark.parametrize("remote", REMOTES)
def test_remote_is_refused_at_load_exactly_when_the_store_refuses_it(remote: str) -> None:
    from daemon.storage.backend import parse_any_remote

    assert (refusal("checkpoints.remote", remote) is None) == accepted_by(parse_any_remote, remote)


def test_gs_and_az_remotes_are_accepted() -> None:
    for remote in ("gs://my-bucket/runs", "az://checkpoints/runs/a"):
        assert config.build(with_key("checkpoints.remote", remote)).checkpoints.remote == remote


METADATA_URLS = [
    "http://169.254.169.254", "http://169.254.169.254/", "http://127.0.0.1:8080",
    "http://[fd00:ec2::254]", "http://metadata.google.internal", "https://169.254.169.254",
    "http://169.254.169.254/latest", "http://h:99999", "http://h:abc", "http://:80",
    "http://h:0", "169.254.169.254", "ftp://h",
]  # fmt: skip


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://169.254.169.254", "plain http"),
        ("http://169.254.169.254/latest", "no path"),
        ("http://h:99999", "port"),
        ("http://h:abc", "port"),
        ("http://h:0", "port"),
    ],
)
def test_imds_url_the_client_cannot_speak_is_refused_at_load(url: str, words: str) -> None:
    message = refusal("imds.url", url)
    assert message is not None and message.startswith("imds.url: ") and words in message


@pytest.mark.parametrize("url", METADATA_URLS)
def test_imds_url_is_refused_at_load_exactly_when_the_client_refuses_it(url: str) -> None:
    from daemon.notices.imds import ImdsClient

    assert (refusal("imds.url", url) is None) == accepted_by(ImdsClient, url)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("s3.endpoint_url", "http://minio_1:9000"),  # docker-compose names: no "_" in a host
        ("s3.endpoint_url", "http://-minio:9000"),
        ("s3.region", "us_east_1"),
        ("s3.region", "us-east-1 "),
    ],
)
def test_s3_values_botocore_would_refuse_are_refused_at_load(key: str, value: str) -> None:
    message = refusal(key, value)
    assert message is not None and message.startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("run.command", ["python", "train.py\0"]),
        ("run.env", {"A=B": "1"}),
        ("run.env", {"A": "x\0y"}),
        ("run.env", {"": "1"}),
        ("run.workdir", "/srv/\0project"),
        ("checkpoints.local_dir", "/data/\0ckpt"),
        ("daemon.runtime_dir", "/run/\0x"),
        ("metrics.textfile", "/var/lib/\0x.prom"),
        ("run.user", "no\0body"),
    ],
)
def test_values_popen_or_the_os_would_refuse_are_refused_at_load(key: str, value: object) -> None:
    # At runtime these raise ValueError (not OSError) from Popen or open(): a traceback.
    message = refusal(key, value)
    assert message is not None and message.startswith(f"{key}: ")
