"""The fault-injecting proxy in front of moto, with boto3 as the client, as the S3 fault
tests use it: a round trip, 100-continue as botocore does it, injected S3 errors.

tests/test_faultproxy.py tests the proxy itself against a stdlib server.
"""

from __future__ import annotations

import os
from typing import Any

import boto3
import pytest
from botocore.config import Config

from daemon.standins import LocalS3
from daemon.standins.faultproxy import FaultProxy


def boto_client(endpoint: str, **config: Any) -> Any:
    cfg = Config(s3={"addressing_style": "path"}, **config)
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=cfg)


def test_boto3_roundtrip_through_the_proxy(s3_server: LocalS3, bucket: str, s3_client: Any) -> None:
    data = os.urandom(3 * 1024 * 1024)  # above 1 MB: botocore sends Expect: 100-continue
    with FaultProxy(s3_server.endpoint_url) as p:
        client = boto_client(p.url)
        client.put_object(Bucket=bucket, Key="k", Body=data, ChecksumAlgorithm="SHA256")
        assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == data
        assert client.head_object(Bucket=bucket, Key="k")["ContentLength"] == len(data)
        (put,) = p.records(method="PUT")
        assert put.headers["expect"] == "100-continue" and put.status == 200
        assert p.stats().connections < p.stats().requests  # botocore reused the connection
    assert s3_client.get_object(Bucket=bucket, Key="k")["Body"].read() == data


def test_boto3_sends_the_body_when_continue_never_comes(
    s3_server: LocalS3, bucket: str, s3_client: Any
) -> None:
    # botocore waits about a second for "100 Continue", then sends the body anyway.
    data = os.urandom(2 * 1024 * 1024)
    with FaultProxy(s3_server.endpoint_url, answer_continue=False) as p:
        boto_client(p.url).put_object(Bucket=bucket, Key="k", Body=data)
        (put,) = p.records(method="PUT")
        assert put.status == 200 and put.attempt == 1
    assert s3_client.get_object(Bucket=bucket, Key="k")["Body"].read() == data


def test_boto3_sees_injected_s3_errors(s3_server: LocalS3, bucket: str) -> None:
    with FaultProxy(s3_server.endpoint_url) as p:
        client = boto_client(p.url, retries={"mode": "standard", "max_attempts": 1})
        p.error(403, "AccessDenied", method="PUT", count=1)
        p.error(404, "NoSuchBucket", method="HEAD", count=1)
        with pytest.raises(client.exceptions.ClientError) as denied:
            client.put_object(Bucket=bucket, Key="k", Body=os.urandom(2 * 1024 * 1024))
        assert denied.value.response["Error"]["Code"] == "AccessDenied"
        with pytest.raises(client.exceptions.ClientError) as missing:
            client.head_object(Bucket=bucket, Key="k")
        assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        client.put_object(Bucket=bucket, Key="k", Body=b"fine")
        assert p.stats().faults["error"] == 2


def test_checksums_verified_as_aws_does(s3_server: LocalS3, bucket: str, s3_client: Any) -> None:
    """With verify_checksums a body that does not match its x-amz-checksum-* header gets
    S3's 400 BadDigest and nothing is stored (moto alone keeps whatever arrives); a body
    flipped on its way is refused the same way, and a right one goes through."""
    data = os.urandom(2 * 1024 * 1024)
    no_retry = {"retries": {"mode": "standard", "max_attempts": 1}}
    # Without the proxy's check, moto stores a body under a wrong checksum.
    boto_client(s3_server.endpoint_url).put_object(
        Bucket=bucket, Key="moto-keeps", Body=b"abc", ChecksumCRC32="AAAAAA=="
    )
    assert s3_client.get_object(Bucket=bucket, Key="moto-keeps")["Body"].read() == b"abc"
    with FaultProxy(s3_server.endpoint_url, verify_checksums=True) as p:
        client = boto_client(p.url, **no_retry)
        with pytest.raises(client.exceptions.ClientError) as wrong:
            client.put_object(Bucket=bucket, Key="wrong", Body=data, ChecksumCRC32="AAAAAA==")
        err = wrong.value.response["Error"]
        assert (err["Code"], err["Message"]) == (
            "BadDigest",
            "The CRC32 you specified did not match the calculated checksum.",
        )
        p.corrupt(phase="request", after_bytes=1000, nbytes=4, method="PUT", count=1)
        with pytest.raises(client.exceptions.ClientError) as flipped:
            client.put_object(Bucket=bucket, Key="flipped", Body=data, ChecksumAlgorithm="SHA256")
        assert flipped.value.response["Error"]["Code"] == "BadDigest"
        # The last byte of a refused body never reached moto: nothing stored.
        for key in ("wrong", "flipped"):
            with pytest.raises(s3_client.exceptions.ClientError):
                s3_client.head_object(Bucket=bucket, Key=key)
        client.put_object(Bucket=bucket, Key="right", Body=data, ChecksumAlgorithm="CRC32")
        up = client.create_multipart_upload(Bucket=bucket, Key="parts", ChecksumAlgorithm="CRC32")
        part = client.upload_part(
            Bucket=bucket,
            Key="parts",
            UploadId=up["UploadId"],
            PartNumber=1,
            Body=data,
            ChecksumAlgorithm="CRC32",
        )
        with pytest.raises(client.exceptions.ClientError) as bad_part:
            client.upload_part(
                Bucket=bucket,
                Key="parts",
                UploadId=up["UploadId"],
                PartNumber=2,
                Body=data,
                ChecksumCRC32=part["ChecksumCRC32"][::-1],
            )
        assert bad_part.value.response["Error"]["Code"] == "BadDigest"
        client.put_object(Bucket=bucket, Key="empty", Body=b"", ChecksumAlgorithm="CRC32")
        with pytest.raises(client.exceptions.ClientError):
            client.put_object(Bucket=bucket, Key="empty-bad", Body=b"", ChecksumCRC32="AAAAAQ==")
        assert p.stats().checksum_rejected == 4
    assert s3_client.get_object(Bucket=bucket, Key="right")["Body"].read() == data
    assert s3_client.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""
