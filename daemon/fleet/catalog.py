"""The small tables we keep: vCPUs and Spot quotas per instance type, on-demand prices.

Spot limits are vCPU quotas per instance *family group* and region, not instance counts:
to run one p4d.24xlarge as spot, "All P Spot Instance Requests" must allow 96 vCPUs.
``doctor`` uses these tables to say which quota to raise and by how much; a type not
listed here has its vCPUs read from EC2 (DescribeInstanceTypes) instead.

On-demand prices are the list prices we compare spot against (``prices``). AWS has no
on-demand price in the APIs ``prices`` already calls, and the Pricing API would mean
another service and permission for one number per type; so the table is kept here, with
its date and source, and ``prices --on-demand TYPE=USD`` overrides any entry.

The flags that name these things (instance types, regions, ``TYPE=USD`` prices) are
parsed here too, once for ``prices``, ``doctor`` and ``report``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Quota:
    """One Service Quotas entry (service code ``ec2``) capping vCPUs of a family group."""

    name: str  # as the Service Quotas console, and the seed's fix, name it
    code: str


@dataclass(frozen=True)
class FamilyQuotas:
    spot: Quota
    on_demand: Quota


# Codes as Service Quotas lists them, for `aws service-quotas request-service-quota-increase`.
P = FamilyQuotas(
    Quota("All P Spot Instance Requests", "L-7212CCBC"),
    Quota("Running On-Demand P instances", "L-417A185B"),
)
G_VT = FamilyQuotas(
    Quota("All G and VT Spot Instance Requests", "L-3819A6DF"),
    Quota("Running On-Demand G and VT instances", "L-DB2E81BA"),
)
STANDARD = FamilyQuotas(
    Quota("All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests", "L-34B43A08"),
    Quota("Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances", "L-1216C47A"),
)
INF = FamilyQuotas(
    Quota("All Inf Spot Instance Requests", "L-B5D1601B"),
    Quota("Running On-Demand Inf instances", "L-1945791B"),
)
TRN = FamilyQuotas(
    Quota("All Trn Spot Instance Requests", "L-6B0D517C"),
    Quota("Running On-Demand Trn instances", "L-2C3B7624"),
)
DL = FamilyQuotas(
    Quota("All DL Spot Instance Requests", "L-85EED4F7"),
    Quota("Running On-Demand DL instances", "L-6E869C2A"),
)
F = FamilyQuotas(
    Quota("All F Spot Instance Requests", "L-88CF9481"),
    Quota("Running On-Demand F instances", "L-74FC7D96"),
)
X = FamilyQuotas(
    Quota("All X Spot Instance Requests", "L-E3A00192"),
    Quota("Running On-Demand X instances", "L-7295265B"),
)

# The family letters of an instance type ("p4d.24xlarge" -> "p", "g4dn" -> "g", "inf2" ->
# "inf") to the quotas that cap them. Everything else is a Standard type.
_FAMILY_QUOTAS = {
    "p": P,
    "g": G_VT,
    "gr": G_VT,
    "vt": G_VT,
    "inf": INF,
    "trn": TRN,
    "dl": DL,
    "f": F,
    "x": X,
}


def quotas_for(instance_type: str) -> FamilyQuotas:
    """The Spot and on-demand vCPU quotas an instance type counts against."""
    m = re.match(r"^([a-z]+)\d", instance_type)
    return _FAMILY_QUOTAS.get(m[1] if m else "", STANDARD)


# Default vCPUs of the GPU types a ladder is made of (DescribeInstanceTypes'
# VCpuInfo.DefaultVCpus). Sizes of one generation double from xlarge (4) up.
VCPUS: dict[str, int] = {
    "p3.2xlarge": 8,
    "p3.8xlarge": 32,
    "p3.16xlarge": 64,
    "p3dn.24xlarge": 96,
    "p4d.24xlarge": 96,
    "p4de.24xlarge": 96,
    "p5.4xlarge": 16,
    "p5.48xlarge": 192,
    "p5e.48xlarge": 192,
    "p5en.48xlarge": 192,
    "g4dn.xlarge": 4,
    "g4dn.2xlarge": 8,
    "g4dn.4xlarge": 16,
    "g4dn.8xlarge": 32,
    "g4dn.12xlarge": 48,
    "g4dn.16xlarge": 64,
    "g4dn.metal": 96,
    **{
        f"{family}.{size}": vcpus
        for family in ("g5", "g6", "g6e")
        for size, vcpus in (
            ("xlarge", 4),
            ("2xlarge", 8),
            ("4xlarge", 16),
            ("8xlarge", 32),
            ("12xlarge", 48),
            ("16xlarge", 64),
            ("24xlarge", 96),
            ("48xlarge", 192),
        )
    },
    "trn1.2xlarge": 8,
    "trn1.32xlarge": 128,
    "trn1n.32xlarge": 128,
    "inf2.xlarge": 4,
    "inf2.8xlarge": 32,
    "inf2.24xlarge": 96,
    "inf2.48xlarge": 192,
}

# --- on-demand list prices -----------------------------------------------------------
#
# Source: the Amazon EC2 On-Demand Pricing page (aws.amazon.com/ec2/pricing/on-demand/),
# Linux, shared tenancy, USD per hour, as listed in December 2024; p4d.24xlarge is the
# seed article's $32.77 (its cost table). These three US regions list the same price for
# each of these types. Caution: AWS cut the on-demand prices of P4d, P4de and P5 in June
# 2025 (by up to 45 %); for those rows the saving shown is an upper bound. Pass
# `prices --on-demand p5.48xlarge=55.04` (or any TYPE=USD) to compare against your price.
ON_DEMAND_AS_OF = "2024-12"
ON_DEMAND_SOURCE = "aws.amazon.com/ec2/pricing/on-demand/ (Linux, us-east-1/us-east-2/us-west-2)"
_US_LIST_USD: dict[str, float] = {
    "p3.2xlarge": 3.06,
    "p3.8xlarge": 12.24,
    "p3.16xlarge": 24.48,
    "p3dn.24xlarge": 31.212,
    "p4d.24xlarge": 32.7726,
    "p4de.24xlarge": 40.9657,
    "p5.48xlarge": 98.32,
    "g4dn.xlarge": 0.526,
    "g4dn.2xlarge": 0.752,
    "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006,
    "g5.2xlarge": 1.212,
    "g5.4xlarge": 1.624,
    "g5.8xlarge": 2.448,
    "g5.12xlarge": 5.672,
    "g5.16xlarge": 4.096,
    "g5.24xlarge": 8.144,
    "g5.48xlarge": 16.288,
    "g6.xlarge": 0.8048,
    "g6.12xlarge": 4.6016,
    "g6.48xlarge": 13.3504,
}
ON_DEMAND_REGIONS = ("us-east-1", "us-east-2", "us-west-2")


def on_demand_usd(region: str, instance_type: str) -> float | None:
    """The table's on-demand price per hour, or None where the table has none."""
    if region not in ON_DEMAND_REGIONS:
        return None
    return _US_LIST_USD.get(instance_type)


def parse_prices(
    flag: str, pairs: Sequence[str], *, example: str, free_ok: bool = False
) -> dict[str, float]:
    """``TYPE=USD`` flags (``--price``, ``--on-demand``) as a table of prices per hour.

    A malformed pair, or a price that is not a finite number above 0 (at least 0 with
    ``free_ok``), raises ValueError naming the flag, the pair and ``example``.
    """
    table: dict[str, float] = {}
    for pair in pairs:
        itype, _, usd = pair.partition("=")
        try:
            price = float(usd)
        except ValueError:
            price = math.nan
        priced = price >= 0 if free_ok else price > 0
        if not itype.strip() or not math.isfinite(price) or not priced:
            raise ValueError(f"{flag}: {pair!r} must be TYPE=USD per hour, like {example}")
        table[itype.strip()] = price
    return table


_TYPE_RE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$")


def parse_instance_types(flag: str, raw: str | None) -> list[str]:
    """``a,b,c`` as a list of instance types; a malformed one raises ValueError naming it."""
    types = [t.strip() for t in (raw or "").split(",") if t.strip()]
    for t in types:
        if not _TYPE_RE.match(t):
            raise ValueError(f"{flag}: {t!r} is not an instance type (like p4d.24xlarge)")
    return types


def parse_regions(flag: str, raw: str | None) -> list[str]:
    """``us-east-1,us-west-2`` as a list; a malformed name raises ValueError naming it."""
    from botocore.exceptions import InvalidRegionError
    from botocore.utils import validate_region_name

    regions = [r.strip() for r in (raw or "").split(",") if r.strip()]
    for r in regions:
        try:
            validate_region_name(r)
        except InvalidRegionError:
            raise ValueError(f"{flag}: {r!r} is not a region name (like us-east-1)") from None
    return regions
