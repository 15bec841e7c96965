"""user-data, doctor and prices as an operator runs them (daemon/fleet/).

EC2 and Auto Scaling run in moto (mock_aws) wherever moto can answer: the spot price
history and offerings (moto has none for p3.16xlarge in us-east-1: a real "not offered as
spot there"), subnets, launch templates, AMIs, groups. What moto never produces is a
failed launch: the scaling activities (and the Spot quotas) come from botocore's Stubber
with the shapes and StatusMessage texts AWS documents and writes.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import tomllib
from botocore.stub import Stubber
from moto import mock_aws
from moto_vpc import make_vpc

from daemon import cli, config
from daemon.fleet import catalog, prices
from daemon.fleet.doctor import Doctor, classify
from daemon.fleet.userdata import (
    CFN_PARAMETER_LIMIT,
    UserDataError,
    dump_toml,
    launch_from_file,
    read_user_data,
    split_remote,
)
from daemon.standins import FAKE_AWS_ENV

REPO = Path(__file__).resolve().parent.parent
REGION = "us-east-1"

RUN_TOML = """\
# a comment that does not travel
[run]
id = "llama-ft-001"
command = ["/opt/dlami/nvme/venv/bin/python", "train.py", "--note", "a \\"b\\"\\tc ü"]
env = { HF_HOME = "/opt/dlami/nvme/hf", "odd.name" = "x" }
nodes = 2

[checkpoints]
local_dir = "/opt/dlami/nvme/checkpoints"
remote = "s3://my-bucket/spot-runs/"

[imds]
poll_interval = 0.5

[daemon]
exit_code_after_notice = 75
"""


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- user-data -------------------------------------------------------------------------


def test_user_data_command_prints_cloud_config_and_cfn_parameters(tmp_path: Path) -> None:
    path = write(tmp_path, RUN_TOML)
    env = {**os.environ, **FAKE_AWS_ENV, "SPOT_SUPERVISOR_RUN_ID": "not-from-the-laptop"}
    run = [sys.executable, "-m", "daemon", "user-data", "--config", str(path)]
    out = subprocess.run(run, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("#cloud-config\n") and "- [systemctl, start, --no-block" in text
    toml_text, launch_env = read_user_data(text)
    # The file, validated and rewritten without its comments; the laptop's environment
    # does not travel (the run id is the file's).
    assert tomllib.loads(toml_text) == tomllib.loads(RUN_TOML)
    assert "a comment" not in toml_text
    assert launch_env == {
        "SPOT_SUPERVISOR_RUN_ID": "llama-ft-001",
        "SPOT_SUPERVISOR_CHECKPOINTS_REMOTE": "s3://my-bucket/spot-runs",
        "SPOT_SUPERVISOR_RUN_NODES": "2",
    }
    cfg = config.build(tomllib.loads(toml_text), environ=launch_env)
    assert cfg.run.command[-1] == 'a "b"\tc ü' and cfg.daemon.exit_code_after_notice == 75

    out = subprocess.run([*run, "--cfn-parameters"], capture_output=True, text=True, env=env)
    words = dict(w.split("=", 1) for w in out.stdout.split())
    assert list(words) == ["RunId", "Bucket", "Prefix", "Nodes", "RunConfig"]
    assert (words["RunId"], words["Bucket"], words["Prefix"], words["Nodes"]) == (
        "llama-ft-001",
        "my-bucket",
        "spot-runs",
        "2",
    )
    assert base64.b64decode(words["RunConfig"]).decode() == toml_text


def test_dump_toml_round_trips_every_kind_of_value() -> None:
    doc = {
        "run": {
            "id": "r",
            "command": ["a", 'q"uote', "back\\slash", "new\nline", "\x01ctl", "ü"],
            "env": {"A": "1", "with space": "2", "": "3"},
        },
        "daemon": {"stop_budget": 90, "safety_margin": 0.5, "rescan_interval": 1e-05},
        "x": {"flag": True, "off": False, "empty": {}},
    }
    assert tomllib.loads(dump_toml(doc)) == doc
    with pytest.raises(UserDataError, match=r"^run.when: a datetime"):
        dump_toml({"run": {"when": dt.datetime(2026, 1, 1)}})


@pytest.mark.parametrize(
    ("remote", "words"),
    [
        ("s3://my-bucket", "has no prefix"),
        ("s3://My_Bucket/p", "is not an AWS bucket name"),
        ("s3://my-bucket/a*b", "may hold only"),
        ("s3://my..bucket/p", "is not an AWS bucket name"),
    ],
)
def test_remotes_the_stack_cannot_scope_are_refused(remote: str, words: str) -> None:
    with pytest.raises(UserDataError, match=words) as exc:
        split_remote(remote)
    assert str(exc.value).startswith("checkpoints.remote: ")


def test_user_data_exits_2_naming_the_key_or_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write(
        tmp_path, RUN_TOML.replace("exit_code_after_notice = 75", "exit_code_after_notice = 2")
    )
    assert cli.main(["user-data", "--config", str(bad)]) == 2
    assert "daemon.exit_code_after_notice: 2 is reserved" in capsys.readouterr().err
    no_prefix = write(tmp_path, RUN_TOML.replace("s3://my-bucket/spot-runs/", "s3://my-bucket"))
    assert cli.main(["user-data", "--config", str(no_prefix)]) == 2
    assert "checkpoints.remote" in capsys.readouterr().err
    big_env = "env = { " + ", ".join(f'K{i} = "{"v" * 60}"' for i in range(60)) + " }"
    big = write(
        tmp_path,
        RUN_TOML.replace('env = { HF_HOME = "/opt/dlami/nvme/hf", "odd.name" = "x" }', big_env),
    )
    assert cli.main(["user-data", "--config", str(big)]) == 2
    assert f"over CloudFormation's {CFN_PARAMETER_LIMIT}-byte limit" in capsys.readouterr().err


def test_the_shipped_example_config_launches(tmp_path: Path) -> None:
    launch = launch_from_file(REPO / "systemd" / "config.toml")
    assert (launch.bucket, launch.prefix) == ("my-bucket", "spot-runs")


def test_run_path_does_not_import_the_fleet_package() -> None:
    probe = (
        "import sys, daemon.cli, daemon.supervisor\n"
        "print(sorted(m for m in sys.modules if m.startswith('daemon.fleet')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


# --- doctor: what AWS writes into scaling activities ----------------------------------

# StatusMessage texts as Auto Scaling writes them (the code after "Could not launch ...").
MESSAGES = {
    "quota": "Could not launch Spot Instances. MaxSpotInstanceCountExceeded - Max spot instance"
    " count exceeded. Launching EC2 instance failed.",
    "capacity": "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot"
    " capacity available that matches your request. Launching EC2 instance failed.",
    "unfulfillable": "Could not launch Spot Instances. UnfulfillableCapacity - Unable to fulfill"
    " capacity due to your request configuration. Please adjust your request and try again."
    " Launching EC2 instance failed.",
    "price": "Could not launch Spot Instances. SpotMaxPriceTooLow - Your Spot request price of"
    " 0.5 is lower than the minimum required Spot request fulfillment price of 9.8341."
    " Launching EC2 instance failed.",
    "vcpu": "Could not launch On-Demand Instances. VcpuLimitExceeded - You have requested more"
    " vCPU capacity than your current vCPU limit of 0 allows for the instance bucket that the"
    " specified instance type belongs to. Please visit http://aws.amazon.com/contact-us/"
    "ec2-request to request an adjustment to this limit. Launching EC2 instance failed.",
    "addresses": "There are not enough free addresses in subnet 'subnet-0a1b2c3d' to satisfy the"
    " requested number of instances. Launching EC2 instance failed.",
    "ami_arch": "Could not launch Spot Instances. InvalidParameterValue - The architecture"
    " 'x86_64' of the specified instance type does not match the architecture 'arm64' of the"
    " specified AMI. Specify an instance type and an AMI that have matching architectures, and"
    " try again. Launching EC2 instance failed.",
    "ami_missing": "The image id '[ami-0123456789abcdef0]' does not exist. Launching EC2"
    " instance failed.",
    "profile": "Value (llama-InstanceProfile-1X2Y3Z) for parameter iamInstanceProfile.name is"
    " invalid. Invalid IAM Instance Profile name. Launching EC2 instance failed.",
    "unsupported": "Your requested instance type (p4d.24xlarge) is not supported in your"
    " requested Availability Zone (us-east-1e). Please retry your request by not specifying an"
    " Availability Zone or choosing us-east-1a, us-east-1b, us-east-1c. Launching EC2 instance"
    " failed.",
    "other": "Could not launch Spot Instances. OptInRequired - You are not subscribed to this"
    " service. Launching EC2 instance failed.",
}

EXPECTED = {
    "quota": (
        "MaxSpotInstanceCountExceeded",
        'raise "All P Spot Instance Requests" to at least 192',
    ),
    "capacity": (
        "InsufficientInstanceCapacity",
        "add types to InstanceTypes and subnets in more AZs",
    ),
    "unfulfillable": ("UnfulfillableCapacity", "22:00 and 08:00 UTC"),
    "price": ("SpotMaxPriceTooLow", "remove it"),
    "vcpu": ("VcpuLimitExceeded", 'raise "Running On-Demand P instances" to at least 192'),
    "addresses": ("InsufficientFreeAddressesInSubnet", "subnet-0a1b2c3d has no free IP address"),
    "ami_arch": ("InvalidAMI", "bake it here (packer build -var region=us-east-1"),
    "ami_missing": ("InvalidAMIID.NotFound", "AMIs are regional"),
    "profile": ("InstanceProfileMissing", "redeploy the stack"),
    "unsupported": ("Unsupported", "put subnets in the AZs that offer the type"),
    "other": ("OptInRequired", "AWS says: You are not subscribed to this service."),
}


@pytest.fixture(scope="module")
def moto_region() -> Iterator[dict[str, Any]]:
    """moto's EC2 with a VPC of two subnets, a launch template of a real AMI, and one of a
    missing AMI. One per module: the doctor only reads it, and moto's EC2 takes seconds
    to start."""
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc = make_vpc(ec2, REGION, "ab")
        good = ec2.create_launch_template(
            LaunchTemplateName="good", LaunchTemplateData={"ImageId": vpc["ami"]}
        )["LaunchTemplate"]["LaunchTemplateId"]
        gone = ec2.create_launch_template(
            LaunchTemplateName="gone", LaunchTemplateData={"ImageId": "ami-0123456789abcdef0"}
        )["LaunchTemplate"]["LaunchTemplateId"]
        yield {"ec2": ec2, "subnets": vpc["subnets"], "good": good, "gone": gone}


def stubbed_group(
    subnets: list[str], template_id: str, messages: list[str], in_service: int = 0
) -> tuple[Any, Stubber]:
    """An Auto Scaling client answering as AWS does for a group whose launches failed."""
    asg = boto3.client("autoscaling", region_name=REGION)
    stub = Stubber(asg)
    now = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.timezone.utc)
    instances = [
        {
            "InstanceId": f"i-0{n}",
            "AvailabilityZone": f"{REGION}a",
            "LifecycleState": "InService",
            "HealthStatus": "Healthy",
            "ProtectedFromScaleIn": False,
        }
        for n in range(in_service)
    ]
    stub.add_response(
        "describe_auto_scaling_groups",
        {
            "AutoScalingGroups": [
                {
                    "AutoScalingGroupName": "run-SpotGroup-1",
                    "MixedInstancesPolicy": {
                        "LaunchTemplate": {
                            "LaunchTemplateSpecification": {
                                "LaunchTemplateId": template_id,
                                "Version": "1",
                            },
                            "Overrides": [
                                {"InstanceType": t}
                                for t in ("p4d.24xlarge", "p3.16xlarge", "g5.48xlarge")
                            ],
                        },
                        "InstancesDistribution": {
                            "SpotAllocationStrategy": "capacity-optimized-prioritized",
                            "OnDemandPercentageAboveBaseCapacity": 0,
                        },
                    },
                    "MinSize": 0,
                    "MaxSize": 4,
                    "DesiredCapacity": 2,
                    "DefaultCooldown": 300,
                    "AvailabilityZones": [f"{REGION}a", f"{REGION}b"],
                    "HealthCheckType": "EC2",
                    "Instances": instances,
                    "CreatedTime": now,
                    "VPCZoneIdentifier": ",".join(subnets),
                    "CapacityRebalance": True,
                }
            ]
        },
        {"AutoScalingGroupNames": ["run-SpotGroup-1"]},
    )
    activities = [
        {
            "ActivityId": f"a-{n}",
            "AutoScalingGroupName": "run-SpotGroup-1",
            "Description": f"Launching a new EC2 instance.  Status Reason: {m}",
            "Cause": f"At {now:%Y-%m-%dT%H:%M:%SZ} an instance was started in response to a"
            " difference between desired and actual capacity, increasing the capacity from 0"
            " to 2.",
            "StartTime": now - dt.timedelta(minutes=n),
            "EndTime": now - dt.timedelta(minutes=n),
            "StatusCode": "Failed",
            "StatusMessage": m,
            "Progress": 100,
            "Details": json.dumps({"Subnet ID": subnets[0], "Availability Zone": f"{REGION}a"}),
        }
        for n, m in enumerate(messages)
    ]
    stub.add_response(
        "describe_scaling_activities",
        {"Activities": activities},
        {"AutoScalingGroupName": "run-SpotGroup-1", "MaxRecords": 100},
    )
    return asg, stub


def quotas_at(values: dict[str, float]) -> tuple[Any, Stubber]:
    """Service Quotas answering with these values; a code not given was never changed."""
    sq = boto3.client("service-quotas", region_name=REGION)
    stub = Stubber(sq)
    for code, value in values.items():
        stub.add_response(
            "get_service_quota",
            {"Quota": {"ServiceCode": "ec2", "QuotaCode": code, "Value": value}},
            {"ServiceCode": "ec2", "QuotaCode": code},
        )
    return sq, stub


@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_every_failure_maps_to_its_fix(case: str, moto_region: dict[str, Any]) -> None:
    code, fix = EXPECTED[case]
    assert classify(MESSAGES[case]).code == code
    asg, stub = stubbed_group(moto_region["subnets"], moto_region["good"], [MESSAGES[case]] * 3)
    doctor = Doctor(REGION, asg, moto_region["ec2"])
    with stub:
        doctor.run("run-SpotGroup-1", [])
        stub.assert_no_pending_responses()
    lines = doctor.report().splitlines()
    assert lines[0].startswith("FAIL  group run-SpotGroup-1: 0 of 2 instances in service")
    assert "ladder p4d.24xlarge > p3.16xlarge > g5.48xlarge" in lines[0]
    failures = [
        line for line in lines if line.startswith(f"FAIL  {code} (3x, newest 2026-11-28T09:00Z)")
    ]
    assert failures and any(fix in line for line in failures), lines
    assert doctor.failed


def test_quota_failure_names_each_family_with_the_vcpus_the_ladder_needs(
    moto_region: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    asg, asg_stub = stubbed_group(moto_region["subnets"], moto_region["gone"], [MESSAGES["quota"]])
    sq, sq_stub = quotas_at({"L-7212CCBC": 0.0, "L-3819A6DF": 384.0})
    doctor = Doctor(REGION, asg, moto_region["ec2"], sq)
    with asg_stub, sq_stub:
        doctor.run("run-SpotGroup-1", [])
    report = doctor.report()
    # One line per quota: P (p4d 96 / p3 64 vCPUs, x2 nodes) and G and VT (g5.48xlarge 192 x2).
    assert (
        'FAIL  MaxSpotInstanceCountExceeded (1x, newest 2026-11-28T09:00Z): raise "All P Spot'
        ' Instance Requests" to at least 192 vCPUs in us-east-1 (p4d.24xlarge/p3.16xlarge: up to'
        " 96 vCPUs x 2 nodes): aws service-quotas request-service-quota-increase --service-code"
        " ec2 --quota-code L-7212CCBC --desired-value 192 --region us-east-1" in report
    )
    # G and VT already allows 384 vCPUs (2 x g5.48xlarge): not asked for.
    assert '"All G and VT Spot Instance Requests" to at least' not in report
    # The quotas as they stand: P is short, G and VT is enough.
    assert 'FAIL  quota "All P Spot Instance Requests": 0 vCPUs; raise' in report
    assert 'ok    quota "All G and VT Spot Instance Requests": 384 vCPUs, 384 needed' in report
    # moto knows no p3.16xlarge in us-east-1: the seed's "no pricing data" case.
    assert "FAIL  p3.16xlarge: not offered in us-east-1 at all" in report
    assert "ok    p4d.24xlarge: spot in us-east-1a $0.0000, us-east-1b $0.0000" in report
    # The launch template's AMI is gone (moto answers InvalidAMIID.NotFound).
    assert "FAIL  AMI ami-0123456789abcdef0: the AMI is not usable in us-east-1" in report


def test_a_healthy_group_from_the_stack_reports_ok(moto_region: dict[str, Any]) -> None:
    asg, stub = stubbed_group(moto_region["subnets"], moto_region["good"], [], in_service=2)
    doctor = Doctor(REGION, asg, moto_region["ec2"])
    with stub:
        doctor.run("run-SpotGroup-1", ["p4d.24xlarge", "g5.48xlarge"])
    assert not doctor.failed, doctor.report()
    assert (
        doctor.report()
        .splitlines()[0]
        .startswith("ok    group run-SpotGroup-1: 2 of 2 instances in service")
    )
    assert json.loads(doctor.as_json())["failed"] is False


def test_doctor_command_against_moto(capsys: pytest.CaptureFixture[str]) -> None:
    with mock_aws():
        # (moto's Service Quotas implements no ec2 quota: the --types path, which reads
        # them, is tested on the Doctor above with Stubber's quotas.)
        assert cli.main(["doctor", "--region", REGION, "--asg", "nope"]) == 1
        out = capsys.readouterr().out
        assert "FAIL  group nope: no Auto Scaling group of that name in us-east-1" in out
    assert cli.main(["doctor", "--region", REGION]) == 2
    assert cli.main(["doctor", "--types", "P4D 24xl"]) == 2
    assert "--types: 'P4D 24xl' is not an instance type" in capsys.readouterr().err


# --- prices ----------------------------------------------------------------------------


def test_prices_per_region_and_zone_from_moto(capsys: pytest.CaptureFixture[str]) -> None:
    with mock_aws():
        args = ["prices", "--types", "p4d.24xlarge,p3.16xlarge,g5.48xlarge"]
        assert cli.main([*args, "--regions", "us-east-1,us-west-2"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == [
            "region",
            "zone",
            "type",
            "spot",
            "$/h",
            "on-demand",
            "$/h",
            "saving",
        ]
        rows = [line.split() for line in out[1:] if line.startswith("us-") and ":" not in line]
        assert ["us-east-1", "us-east-1a", "p4d.24xlarge", "0.0000", "32.7726", "100%"] in rows
        assert {r[0] for r in rows} == {"us-east-1", "us-west-2"}
        assert any(
            "p3.16xlarge: no spot price history: not offered as spot in us-east-1" in line
            for line in out
        )
        assert out[-1].startswith(f"on-demand: list prices of {catalog.ON_DEMAND_AS_OF}")
        assert (
            cli.main(
                [*args, "--regions", "us-east-1", "--json", "--on-demand", "p4d.24xlarge=21.96"]
            )
            == 0
        )
        (region,) = json.loads(capsys.readouterr().out)
        assert region["not_offered_as_spot"] == ["p3.16xlarge"]
        assert {
            p["on_demand_usd"] for p in region["prices"] if p["instance_type"] == "p4d.24xlarge"
        } == {21.96}
    assert cli.main(["prices", "--types", "p4d.24xlarge", "--regions", "us east"]) == 2
    assert cli.main(["prices", "--types", "p4d.24xlarge", "--on-demand", "p4d=cheap"]) == 2
    assert "--on-demand: 'p4d=cheap' must be TYPE=USD" in capsys.readouterr().err


def test_saving_arithmetic_and_table() -> None:
    row = prices.Row("us-east-1", "us-east-1a", "p4d.24xlarge", 9.83, 32.77, "2026-11-28T09:00:00Z")
    assert row.saving == pytest.approx(0.70, abs=0.001)
    assert prices.Row("eu-west-1", "eu-west-1a", "p4d.24xlarge", 9.83, None, "").saving is None
    table = prices.render([prices.Region("us-east-1", [row], ["p3.16xlarge"])], {})
    assert "us-east-1  us-east-1a  p4d.24xlarge    9.8300        32.7700     70%" in table
    assert catalog.on_demand_usd("us-west-2", "g5.48xlarge") == 16.288
    assert catalog.on_demand_usd("eu-west-1", "g5.48xlarge") is None


def test_quota_table_covers_the_seeds_families() -> None:
    assert catalog.quotas_for("p4d.24xlarge").spot.name == "All P Spot Instance Requests"
    assert catalog.quotas_for("p5.48xlarge").spot.code == "L-7212CCBC"
    assert catalog.quotas_for("g5.48xlarge").spot.name == "All G and VT Spot Instance Requests"
    assert catalog.quotas_for("g4dn.xlarge").spot.code == "L-3819A6DF"
    assert catalog.quotas_for("trn1.32xlarge").spot.name == "All Trn Spot Instance Requests"
    assert catalog.quotas_for("c5.xlarge").spot.name.startswith("All Standard")
    assert catalog.VCPUS["p4d.24xlarge"] == 96 and catalog.VCPUS["g5.48xlarge"] == 192
