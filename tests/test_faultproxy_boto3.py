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
