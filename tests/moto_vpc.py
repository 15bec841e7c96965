"""A VPC in moto's EC2 (inside ``mock_aws``) for the fleet tests (no tests here).

test_fleet_commands.py (the doctor) and test_fleet_stack.py (the CloudFormation stack)
each build one per module. What must not live here: what a test launches into it.
"""

from __future__ import annotations

from typing import Any


def make_vpc(ec2: Any, region: str, zones: str) -> dict[str, Any]:
    """A VPC with one subnet per zone letter in ``zones`` (``10.0.<i>.0/24`` in
    ``<region><letter>``), and an Amazon AMI: ``{"vpc", "subnets", "ami"}``."""
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{region}{z}")[
            "Subnet"
        ]["SubnetId"]
        for i, z in enumerate(zones)
    ]
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return {"vpc": vpc, "subnets": subnets, "ami": ami}
