"""deploy/aws/spot-training.yaml, created in moto's CloudFormation (mock_aws, in process).

What moto runs for real: the template's parameters, conditions and intrinsic functions,
the IAM role and instance profile, the security group, the launch template, the Auto
Scaling group with its mixed-instances policy, the instances it launches with the launch
template's user-data, and the replacement of a terminated instance.

What moto does not model (held to the template text instead, or left to cfn-lint):
``CapacityRebalance`` (its CloudFormation model drops the property), ``MetricsCollection``,
CloudWatch alarms and scaling policies (skipped with a warning), AWS managed policies
(Session Manager's), inline policies (kept as Python's repr), the launch template's
metadata options on the instance itself (it reports the launch template's), spot as a
market (its instances are plain), and an EC2 health check that would notice an
interruption by itself: the test terminates through the group, as its health check does.
"""

from __future__ import annotations

import ast
import base64
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import tomllib
from cfnlint.decode import decode_str
from moto import mock_aws
from moto_vpc import make_vpc

from daemon import config
from daemon.fleet import userdata
from daemon.fleet.userdata import Launch, launch_from_file, read_user_data

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "deploy" / "aws" / "spot-training.yaml"
REGION = "us-east-1"
LADDER = ["p4d.24xlarge", "p3.16xlarge", "g5.48xlarge"]

RUN_TOML = """
[run]
id = "llama-ft-001"
command = ["/opt/dlami/nvme/venv/bin/python", "train.py", "--epochs", "3"]
workdir = "/opt/dlami/nvme/project"
env = { HF_HOME = "/opt/dlami/nvme/hf" }

[checkpoints]
local_dir = "/opt/dlami/nvme/checkpoints"
remote = "s3://my-bucket/spot-runs"

[daemon]
stop_budget = 90
"""


@pytest.fixture
def launch(tmp_path: Path) -> Launch:
    path = tmp_path / "run.toml"
    path.write_text(RUN_TOML)
    return launch_from_file(path)


@pytest.fixture(scope="module")
def aws() -> Iterator[dict[str, Any]]:
    """moto in process, with a VPC of three subnets in three AZs and an AMI. One per module
    (moto's EC2 takes seconds to start); each test deploys a stack of its own."""
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        yield {"ec2": ec2, **make_vpc(ec2, REGION, "abc")}


def deploy(aws: dict[str, Any], launch: Launch, **extra: str) -> dict[str, Any]:
    """What `aws cloudformation deploy` does with the README's parameters; the outputs."""
    name = f"run-{uuid.uuid4().hex[:8]}"
    params = {
        **launch.cfn_parameters(),
        "AmiId": aws["ami"],
        "VpcId": aws["vpc"],
        "SubnetIds": ",".join(aws["subnets"]),
        "InstanceTypes": ",".join(LADDER),
        **extra,
    }
    cf = boto3.client("cloudformation", region_name=REGION)
    cf.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    stack = cf.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    resources = cf.list_stack_resources(StackName=name)["StackResourceSummaries"]
    physical = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in resources}
    return {**{o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}, **physical}


def group(name: str) -> dict[str, Any]:
    asg = boto3.client("autoscaling", region_name=REGION)
    groups = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    assert len(groups) == 1
    return groups[0]


def instance_user_data(ec2: Any, instance_id: str) -> str:
    value = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(value["UserData"]["Value"]).decode("utf-8")


def test_stack_builds_the_ladder_group_with_imdsv2_and_the_runs_user_data(
    aws: dict[str, Any], launch: Launch
) -> None:
    outputs = deploy(aws, launch)
    g = group(outputs["SpotGroupName"])

    # The ladder, in order, spot only, capacity first then priority, across three AZs.
    policy = g["MixedInstancesPolicy"]
    assert [o["InstanceType"] for o in policy["LaunchTemplate"]["Overrides"]] == LADDER
    dist = policy["InstancesDistribution"]
    assert dist["SpotAllocationStrategy"] == "capacity-optimized-prioritized"
    assert dist["OnDemandBaseCapacity"] == 0 and dist["OnDemandPercentageAboveBaseCapacity"] == 0
    assert (g["DesiredCapacity"], g["MinSize"], g["MaxSize"]) == (1, 0, 2)
    assert sorted(g["VPCZoneIdentifier"].split(",")) == sorted(aws["subnets"])
    assert sorted(g["AvailabilityZones"]) == [f"{REGION}a", f"{REGION}b", f"{REGION}c"]
    assert {t["Key"]: t["Value"] for t in g["Tags"]}["spot-supervisor:run"] == "llama-ft-001"

    # The launch template: IMDSv2 required, hop limit 1 (the parameter's default).
    ec2 = aws["ec2"]
    spec = policy["LaunchTemplate"]["LaunchTemplateSpecification"]
    versions = ec2.describe_launch_template_versions(LaunchTemplateId=spec["LaunchTemplateId"])
    data = versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert data["MetadataOptions"] == {
        "HttpTokens": "required",
        "HttpPutResponseHopLimit": 1,
        "HttpEndpoint": "enabled",
        "InstanceMetadataTags": "disabled",
    }
    assert data["ImageId"] == aws["ami"]
    assert data["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")

    # The instance the group launched carries the user-data `spot-supervisor user-data`
    # prints, byte for byte; the config in it is the run's, and loads with its overrides.
    (instance,) = g["Instances"]
    assert instance["InstanceType"] == LADDER[0]
    text = instance_user_data(ec2, instance["InstanceId"])
    assert text == launch.user_data()
    assert text.startswith("#cloud-config\n")
    toml_text, env = read_user_data(text)
    assert env == {
        "SPOT_SUPERVISOR_RUN_ID": "llama-ft-001",
        "SPOT_SUPERVISOR_CHECKPOINTS_REMOTE": "s3://my-bucket/spot-runs",
        "SPOT_SUPERVISOR_RUN_NODES": "1",
    }
    doc = tomllib.loads(toml_text)
    assert doc == tomllib.loads(RUN_TOML)
    cfg = config.build(doc, environ=env)
    assert cfg.run.id == "llama-ft-001"
    assert cfg.run.command == ("/opt/dlami/nvme/venv/bin/python", "train.py", "--epochs", "3")
    assert cfg.checkpoints.remote == "s3://my-bucket/spot-runs"

    # The stack's Doctor output names the group and the ladder.
    assert outputs["Doctor"] == (
        f"spot-supervisor doctor --region {REGION} --asg {g['AutoScalingGroupName']}"
        f" --types {','.join(LADDER)}"
    )


def test_instance_role_carries_exactly_the_shipped_policy_scoped_to_bucket_and_prefix(
    aws: dict[str, Any], launch: Launch
) -> None:
    stack = deploy(aws, launch)
    iam = boto3.client("iam", region_name=REGION)
    profile = iam.get_instance_profile(InstanceProfileName=stack["InstanceProfile"])
    (role,) = profile["InstanceProfile"]["Roles"]
    assert role["RoleName"] == stack["InstanceRole"]
    names = iam.list_role_policies(RoleName=role["RoleName"])["PolicyNames"]
    assert names == ["spot-supervisor-checkpoints"]
    got = iam.get_role_policy(RoleName=role["RoleName"], PolicyName=names[0])["PolicyDocument"]
    if isinstance(got, str):
        # moto keeps a CloudFormation inline policy as Python's repr of the dict, not JSON.
        got = ast.literal_eval(got)
    shipped = (REPO / "systemd" / "iam-policy.json").read_text()
    want = json.loads(shipped.replace("BUCKET", "my-bucket").replace("PREFIX", "spot-runs"))
    assert got == want
    # Besides it, only Session Manager's managed policy, and only when asked for (moto
    # does not load AWS's managed policies, so this is read from the template).
    role_props = template()["Resources"]["InstanceRole"]["Properties"]
    assert role_props["ManagedPolicyArns"]["Fn::If"][0] == "UseSessionManager"
    assert [p["PolicyName"] for p in role_props["Policies"]] == ["spot-supervisor-checkpoints"]


def test_terminated_instance_is_replaced_with_the_same_run(
    aws: dict[str, Any], launch: Launch
) -> None:
    outputs = deploy(aws, launch, Nodes="2")
    name = outputs["SpotGroupName"]
    before = [i["InstanceId"] for i in group(name)["Instances"]]
    assert len(before) == 2 and group(name)["MaxSize"] == 4
    # A spot interruption ends an instance; the group's health check then terminates it
    # without lowering the desired capacity, which is what this call does.
    asg = boto3.client("autoscaling", region_name=REGION)
    asg.terminate_instance_in_auto_scaling_group(
        InstanceId=before[0], ShouldDecrementDesiredCapacity=False
    )
    after = [i["InstanceId"] for i in group(name)["Instances"]]
    assert len(after) == 2 and before[0] not in after and before[1] in after
    (new,) = set(after) - set(before)
    state = aws["ec2"].describe_instances(InstanceIds=[before[0]])["Reservations"][0]
    assert state["Instances"][0]["State"]["Name"] == "terminated"
    # The replacement boots the same run (it restores the newest committed checkpoint).
    _, env = read_user_data(instance_user_data(aws["ec2"], new))
    assert env["SPOT_SUPERVISOR_RUN_ID"] == "llama-ft-001"
    assert env["SPOT_SUPERVISOR_RUN_NODES"] == "2"


def test_a_short_ladder_leaves_the_empty_slots_out(aws: dict[str, Any], launch: Launch) -> None:
    outputs = deploy(aws, launch, InstanceTypes="g5.48xlarge,g6.48xlarge")
    overrides = group(outputs["SpotGroupName"])["MixedInstancesPolicy"]["LaunchTemplate"]
    assert [o["InstanceType"] for o in overrides["Overrides"]] == ["g5.48xlarge", "g6.48xlarge"]


# moto's CloudFormation has no model of alarms and scaling policies: it skips them, warning.
@pytest.mark.filterwarnings("ignore:Tried to parse:UserWarning")
def test_on_demand_last_resort_is_a_second_group_that_starts_empty(
    aws: dict[str, Any], launch: Launch
) -> None:
    outputs = deploy(aws, launch, OnDemandLastResort="true")
    od = group(outputs["OnDemandGroupName"])
    assert od["Instances"] == [] and od["MaxSize"] == 1
    dist = od["MixedInstancesPolicy"]["InstancesDistribution"]
    assert dist["OnDemandPercentageAboveBaseCapacity"] == 100
    assert dist["OnDemandAllocationStrategy"] == "prioritized"
    ladder = [o["InstanceType"] for o in od["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]]
    assert ladder == LADDER
    # The spot group is unchanged by it.
    assert len(group(outputs["SpotGroupName"])["Instances"]) == 1


# --- the template text: what moto drops, and agreement with the code -----------------


def template() -> dict[str, Any]:
    doc, matches = decode_str(TEMPLATE.read_text())
    assert not matches and doc is not None
    return dict(doc)


def test_template_user_data_is_the_renderers_template_word_for_word() -> None:
    lt = template()["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert lt["UserData"]["Fn::Base64"]["Fn::Sub"] == userdata.USER_DATA_TEMPLATE
    # Every ${Name} in it is a parameter of the template.
    names = set(re.findall(r"\$\{(\w+)\}", userdata.USER_DATA_TEMPLATE))
    assert names == set(Launch("r", "b", "p", 1, "").cfn_parameters())
    assert names <= set(template()["Parameters"])


def test_template_patterns_are_the_commands() -> None:
    params = template()["Parameters"]
    assert params["RunId"]["AllowedPattern"] == userdata.RUN_ID_PATTERN
    assert params["Bucket"]["AllowedPattern"] == userdata.BUCKET_PATTERN
    assert params["Prefix"]["AllowedPattern"] == userdata.PREFIX_PATTERN
    assert params["Nodes"]["AllowedValues"] == [str(n) for n in range(1, 17)]
    assert set(template()["Mappings"]["Headroom"]) == set(params["Nodes"]["AllowedValues"])


def test_template_spot_group_rebalances_and_requires_imdsv2() -> None:
    res = template()["Resources"]
    spot = res["SpotGroup"]["Properties"]
    assert spot["CapacityRebalance"] is True
    assert "Condition" not in res["SpotGroup"]
    metadata = res["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
    assert metadata["HttpTokens"] == "required"
    # Instance market options would pin every launch of the template to spot (or refuse
    # the on-demand group); the groups choose the market.
    assert "InstanceMarketOptions" not in res["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    for name in (
        "OnDemandGroup",
        "OnDemandStart",
        "OnDemandStop",
        "SpotShortAlarm",
        "SpotBackAlarm",
    ):
        assert res[name]["Condition"] == "UseOnDemand"


def test_cfn_lint_passes() -> None:
    from cfnlint.api import ManualArgs, lint

    matches = lint(TEMPLATE.read_text(), config=ManualArgs(regions=["us-east-1", "us-west-2"]))
    assert [str(m) for m in matches] == []
