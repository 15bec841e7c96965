"""``spot-supervisor doctor``: why a fleet does not run, and what fixes it.

It reads what AWS already wrote down: the Auto Scaling group's scaling activities (each
failed launch carries EC2's error code in its status message), the spot price history
and the instance type offerings for the ladder's types in the region, the Spot vCPU
quotas, and the launch template's AMI. Every finding is one line, ``FAIL`` or ``ok``,
and every ``FAIL`` ends in its fix, in the seed article's words where it has them:

- ``MaxSpotInstanceCountExceeded``: raise "All P Spot Instance Requests" (or "All G and VT
  Spot Instance Requests", ...) to the vCPUs the ladder needs;
- ``VcpuLimitExceeded``: the same for the market that failed ("Running On-Demand P
  instances", ...);
- ``InsufficientInstanceCapacity``, ``UnfulfillableCapacity``: more instance types, more
  AZs, a stack in another region, off-peak hours;
- no spot price history for a type: not offered as spot in that region;
- ``SpotMaxPriceTooLow``: remove the maximum price;
- ``InsufficientFreeAddressesInSubnet``: free addresses, or a larger subnet;
- ``InvalidAMIID.*``, ``InvalidParameterValue`` on the AMI: an AMI of this region and
  architecture;
- the instance profile missing: redeploy the stack (or recreate the profile);
- ``Unsupported`` (the type is not in that AZ): subnets in AZs that offer it.

Exit status: 0 when nothing failed, 1 when something did (or AWS could not be asked),
2 for bad usage.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from daemon.fleet import catalog

if TYPE_CHECKING:
    from mypy_boto3_autoscaling import AutoScalingClient
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_service_quotas import ServiceQuotasClient

# The seed's advice for capacity: broaden the pool, and the hours GPU spot is easiest.
OFF_PEAK = "GPU spot is usually easiest to get between 22:00 and 08:00 UTC"


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    ok: bool
    subject: str
    text: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.subject}: {self.text}"


@dataclass
class Group:
    """What the report needs of an Auto Scaling group."""

    name: str
    desired: int
    in_service: int
    types: list[str]
    azs: list[str]
    launch_template: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A failed launch, classified from a scaling activity's status message."""

    code: str  # EC2's error code, or our name for a message that carries none
    market: str  # "Spot", "On-Demand" or "" when the message does not say
    message: str  # AWS's text after the code
    when: dt.datetime | None


# "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot
# capacity available that matches your request. Launching EC2 instance failed."
_COULD_NOT_LAUNCH = re.compile(
    r"Could not launch (Spot|On-Demand) Instances\.\s+([A-Za-z][A-Za-z0-9.]*)\s+-\s+(.*)", re.S
)
# Messages EC2 writes without a code in front (older groups, single-type launches).
_PLAIN_MESSAGES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("InsufficientInstanceCapacity", re.compile(r"do not have sufficient .* capacity", re.S)),
    ("InsufficientFreeAddressesInSubnet", re.compile(r"not enough free addresses in subnet")),
    ("VcpuLimitExceeded", re.compile(r"more vCPU capacity than your current vCPU limit")),
    ("MaxSpotInstanceCountExceeded", re.compile(r"Max spot instance count exceeded", re.I)),
    ("InvalidAMIID.NotFound", re.compile(r"image id '\[?ami-[0-9a-f]+\]?' does not exist")),
    ("InstanceProfileMissing", re.compile(r"[Ii]nvalid IAM Instance Profile|iamInstanceProfile")),
    ("Unsupported", re.compile(r"is not supported in your requested Availability Zone")),
)


def classify(status_message: str, when: dt.datetime | None = None) -> Failure:
    """EC2's error code and market from a scaling activity's StatusMessage."""
    m = _COULD_NOT_LAUNCH.search(status_message)
    if m:
        market, code, rest = m[1], m[2], m[3]
    else:
        market, code, rest = "", "", status_message
    rest = rest.replace("Launching EC2 instance failed.", "").strip()
    # A code that only says "parameter" is told apart by what the message names.
    if code in ("", "InvalidParameterValue", "InvalidParameter", "InvalidParameterCombination"):
        for name, pattern in _PLAIN_MESSAGES:
            if pattern.search(rest):
                code = name
                break
        else:
            if code.startswith("InvalidParameter") and re.search(
                r"\bAMI\b|image|architecture", rest, re.I
            ):
                code = "InvalidAMI"
    return Failure(code or "Unrecognised", market, rest, when)


class Doctor:
    """Asks AWS, keeps the findings; :meth:`report` renders them."""

    def __init__(
        self,
        region: str,
        autoscaling: AutoScalingClient,
        ec2: EC2Client,
        quotas: ServiceQuotasClient | None = None,
    ) -> None:
        self.region = region
        self.autoscaling = autoscaling
        self.ec2 = ec2
        self.quotas = quotas
        self.findings: list[Finding] = []
        self.notes: list[str] = []
        self._quota_values: dict[str, float | None] = {}

    def fail(self, subject: str, text: str) -> None:
        self.findings.append(Finding(False, subject, text))

    def ok(self, subject: str, text: str) -> None:
        self.findings.append(Finding(True, subject, text))

    # --- the checks ----------------------------------------------------------------------

    def run(self, asg: str | None, types: Sequence[str], nodes: int | None = None) -> None:
        group = self.group(asg) if asg else None
        ladder = list(types) or (group.types if group else [])
        need_nodes = nodes or (group.desired if group and group.desired else 1)
        if group is not None:
            self.activities(group, ladder, need_nodes)
            self.image(group)
        if ladder:
            self.offerings(ladder, group)
            self.spot_quotas(ladder, need_nodes)
        elif asg is None:
            self.notes.append("nothing to check: give --asg NAME or --types TYPE,...")

    def group(self, name: str) -> Group | None:
        out = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
        groups = out.get("AutoScalingGroups", [])
        if not groups:
            self.fail(
                f"group {name}",
                f"no Auto Scaling group of that name in {self.region}: check --region, and the"
                " stack's SpotGroupName output",
            )
            return None
        g = groups[0]
        policy = g.get("MixedInstancesPolicy", {}).get("LaunchTemplate", {})
        types = [o["InstanceType"] for o in policy.get("Overrides", []) if "InstanceType" in o]
        raw_spec = policy.get("LaunchTemplateSpecification", {}) or g.get("LaunchTemplate", {})
        spec = {k: str(v) for k, v in raw_spec.items()}
        in_service = sum(
            1 for i in g.get("Instances", []) if i.get("LifecycleState") == "InService"
        )
        subnets = [s for s in g.get("VPCZoneIdentifier", "").split(",") if s]
        azs = sorted(g.get("AvailabilityZones", []))
        if subnets:
            described = self.ec2.describe_subnets(SubnetIds=subnets)["Subnets"]
            azs = sorted({s["AvailabilityZone"] for s in described})
        group = Group(g["AutoScalingGroupName"], g["DesiredCapacity"], in_service, types, azs, spec)
        text = (
            f"{in_service} of {group.desired} instances in service; ladder"
            f" {' > '.join(types) or '(launch template only)'}; AZs {', '.join(azs) or '-'}"
        )
        if in_service >= group.desired:
            self.ok(f"group {group.name}", text)
        else:
            self.fail(f"group {group.name}", text + " (the lines below say why)")
        return group

    def activities(self, group: Group, ladder: Sequence[str], nodes: int) -> None:
        out = self.autoscaling.describe_scaling_activities(
            AutoScalingGroupName=group.name, MaxRecords=100
        )
        failures: dict[tuple[str, str], list[Failure]] = {}
        for a in out.get("Activities", []):
            if a.get("StatusCode") not in ("Failed", "Cancelled"):
                continue
            f = classify(a.get("StatusMessage") or a.get("Description", ""), a.get("StartTime"))
            failures.setdefault((f.code, f.market), []).append(f)
        if not failures:
            self.ok("scaling activities", "no failed launch among the newest 100")
            return
        for (code, market), seen in failures.items():
            newest = max((f.when for f in seen if f.when), default=None)
            when = f", newest {newest:%Y-%m-%dT%H:%MZ}" if newest else ""
            subject = f"{code} ({len(seen)}x{when})"
            for fix in self.fixes(code, market, seen[0].message, ladder, nodes, group):
                self.fail(subject, fix)

    def fixes(
        self, code: str, market: str, message: str, ladder: Sequence[str], nodes: int, group: Group
    ) -> list[str]:
        """The fix for one kind of failure, one line each (one per quota to raise)."""
        if code in ("MaxSpotInstanceCountExceeded", "VcpuLimitExceeded"):
            spot = code == "MaxSpotInstanceCountExceeded" or market == "Spot"
            # Every quota the ladder counts against, except those known to be enough now.
            return [
                self.quota_fix(quota, vcpus, nodes, types)
                for quota, (vcpus, types) in self.needed_quotas(ladder, spot).items()
                if (self.known_quota(quota) or 0.0) < vcpus * nodes
            ] or ["raise the vCPU quota of the ladder's family (Service Quotas, service ec2)"]
        if code in (
            "InsufficientInstanceCapacity",
            "UnfulfillableCapacity",
            "InsufficientSpotCapacity",
        ):
            return [
                f"no {market.lower() or 'spot'} capacity in the group's pools"
                f" ({len(group.types) or len(ladder)} types x {len(group.azs)} AZs): add types to"
                " InstanceTypes and subnets in more AZs to SubnetIds, or deploy the stack in"
                f" another region too; {OFF_PEAK}"
            ]
        if code == "SpotMaxPriceTooLow":
            return [
                "a maximum spot price below the current price is set (launch template"
                " InstanceMarketOptions or the group's SpotMaxPrice): remove it, the default is"
                " the on-demand price"
            ]
        if code == "InsufficientFreeAddressesInSubnet":
            subnet = re.search(r"subnet-[0-9a-f]+", message)
            where = subnet[0] if subnet else "a subnet of the group"
            return [
                f"{where} has no free IP address: free some, or add a larger subnet to SubnetIds"
            ]
        if code in (
            "InvalidAMIID.NotFound",
            "InvalidAMIID.Malformed",
            "InvalidAMIID.Unavailable",
            "InvalidAMI",
        ):
            return [
                f"the AMI is not usable in {self.region} ({message[:160]}): AMIs are regional,"
                f" bake it here (packer build -var region={self.region} systemd/packer) or"
                " `aws ec2 copy-image`, for the ladder's architecture (x86_64 for p/g types)"
            ]
        if code == "InstanceProfileMissing":
            return [
                "the launch template's instance profile does not exist (deleted by hand, or not"
                " yet visible right after creation): redeploy the stack, which recreates it"
                " with systemd/iam-policy.json"
            ]
        if code == "Unsupported":
            return [f"{message[:200]}: put subnets in the AZs that offer the type (see below)"]
        return [f"AWS says: {message[:300]}"]

    def needed_quotas(
        self, ladder: Sequence[str], spot: bool
    ) -> dict[catalog.Quota, tuple[int, list[str]]]:
        """Per quota: the vCPUs one instance of its largest ladder type needs, and the types."""
        need: dict[catalog.Quota, tuple[int, list[str]]] = {}
        for t in ladder:
            family = catalog.quotas_for(t)
            quota = family.spot if spot else family.on_demand
            vcpus = self.vcpus(t)
            most, types = need.get(quota, (0, []))
            need[quota] = (max(most, vcpus), [*types, t])
        return need

    def quota_fix(self, quota: catalog.Quota, vcpus: int, nodes: int, types: list[str]) -> str:
        total = vcpus * nodes
        return (
            f'raise "{quota.name}" to at least {total} vCPUs in {self.region}'
            f" ({'/'.join(types)}: up to {vcpus} vCPUs x {nodes} node{'s' if nodes > 1 else ''}):"
            f" aws service-quotas request-service-quota-increase --service-code ec2"
            f" --quota-code {quota.code} --desired-value {total} --region {self.region}"
            " (it takes 1-3 business days)"
        )

    def vcpus(self, instance_type: str) -> int:
        if instance_type in catalog.VCPUS:
            return catalog.VCPUS[instance_type]
        try:
            out = self.ec2.describe_instance_types(InstanceTypes=[instance_type])  # type: ignore[list-item]
            return int(out["InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"])
        except (ClientError, KeyError, IndexError):
            return 0

    def offerings(self, ladder: Sequence[str], group: Group | None) -> None:
        """Per type: offered in the region and the group's AZs, and sold as spot there."""
        now = dt.datetime.now(dt.timezone.utc)
        prices: dict[str, dict[str, float]] = {t: {} for t in ladder}
        paginator = self.ec2.get_paginator("describe_spot_price_history")
        for page in paginator.paginate(
            InstanceTypes=list(ladder),  # type: ignore[arg-type]
            ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            StartTime=now,
        ):
            for p in page.get("SpotPriceHistory", []):
                prices.setdefault(p["InstanceType"], {})[p["AvailabilityZone"]] = float(
                    p["SpotPrice"]
                )
        offered: dict[str, set[str]] = {t: set() for t in ladder}
        for offers in self.ec2.get_paginator("describe_instance_type_offerings").paginate(
            LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": list(ladder)}],
        ):
            for o in offers.get("InstanceTypeOfferings", []):
                offered.setdefault(o["InstanceType"], set()).add(o["Location"])
        for t in ladder:
            azs = offered.get(t, set())
            spot = prices.get(t, {})
            if not azs:
                self.fail(
                    t,
                    f"not offered in {self.region} at all: drop it from InstanceTypes, or use it"
                    " from a stack in a region that has it",
                )
                continue
            if not spot:
                self.fail(
                    t,
                    f"no spot price history in {self.region}: not offered as spot there (the"
                    " seed: zero spot capacity); drop it from InstanceTypes or try another region",
                )
                continue
            if group is not None and group.azs and not azs & set(group.azs):
                self.fail(
                    t,
                    f"offered in {', '.join(sorted(azs))}, none of the group's AZs"
                    f" ({', '.join(group.azs)}): add a subnet in one of them to SubnetIds",
                )
                continue
            where = {
                az: p for az, p in spot.items() if group is None or not group.azs or az in group.azs
            }
            listed = ", ".join(f"{az} ${p:.4f}" for az, p in sorted(where.items())) or "-"
            self.ok(t, f"spot in {listed} (per hour)")

    def spot_quotas(self, ladder: Sequence[str], nodes: int) -> None:
        if self.quotas is None:
            return
        for quota, (vcpus, types) in self.needed_quotas(ladder, spot=True).items():
            value = self.known_quota(quota)
            if value is None:
                continue
            total = vcpus * nodes
            if value < total:
                self.fail(
                    f'quota "{quota.name}"',
                    f"{value:g} vCPUs; " + self.quota_fix(quota, vcpus, nodes, types),
                )
            else:
                self.ok(f'quota "{quota.name}"', f"{value:g} vCPUs, {total} needed")

    def known_quota(self, quota: catalog.Quota) -> float | None:
        """The quota's value now, read once; None (and a note) when it cannot be read."""
        if self.quotas is None:
            return None
        if quota.code not in self._quota_values:
            value: float | None = None
            try:
                value = self.quota_value(quota.code)
                if value is None:
                    self.notes.append(f"{quota.name} ({quota.code}): not listed in {self.region}")
            except (ClientError, BotoCoreError) as exc:
                self.notes.append(f"could not read {quota.name} ({quota.code}): {exc}")
            self._quota_values[quota.code] = value
        return self._quota_values[quota.code]

    def quota_value(self, code: str) -> float | None:
        assert self.quotas is not None
        try:
            return float(
                self.quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"]
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchResourceException":
                raise
        # An account that never changed it has only the default.
        try:
            out = self.quotas.get_aws_default_service_quota(ServiceCode="ec2", QuotaCode=code)
            return float(out["Quota"]["Value"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchResourceException":
                return None
            raise

    def image(self, group: Group) -> None:
        spec = group.launch_template
        lt_id = spec.get("LaunchTemplateId")
        if not lt_id:
            return
        versions = self.ec2.describe_launch_template_versions(
            LaunchTemplateId=lt_id, Versions=[spec.get("Version") or "$Default"]
        )["LaunchTemplateVersions"]
        data: dict[str, Any] = dict(versions[0].get("LaunchTemplateData", {})) if versions else {}
        ami = data.get("ImageId")
        if not ami:
            return
        try:
            images = self.ec2.describe_images(ImageIds=[ami])["Images"]
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if not code.startswith("InvalidAMIID"):
                raise
            images = []
        if not images:
            self.fail(
                f"AMI {ami}",
                self.fixes("InvalidAMIID.NotFound", "", f"{ami} does not exist", [], 1, group)[0],
            )
        else:
            self.ok(
                f"AMI {ami}", f"{images[0].get('Name', '')} ({images[0].get('Architecture', '?')})"
            )

    # --- output ----------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return any(not f.ok for f in self.findings)

    def report(self) -> str:
        lines = [f.line() for f in self.findings] + [f"note  {n}" for n in self.notes]
        if not self.findings:
            lines.append("nothing found to check")
        return "\n".join(lines)

    def as_json(self) -> str:
        return json.dumps(
            {
                "region": self.region,
                "failed": self.failed,
                "findings": [
                    {"ok": f.ok, "subject": f.subject, "text": f.text} for f in self.findings
                ],
                "notes": self.notes,
            },
            indent=2,
        )
