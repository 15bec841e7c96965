"""deploy/skypilot/train.yaml: a SkyPilot managed job that runs the supervisor in the foreground.

Two checks:

- always: the YAML against SkyPilot's task and resources schema, transcribed below from
  SkyPilot 0.14.1 (``sky/utils/schemas.py``: every top-level and resources key it
  accepts, and the full ``job_recovery`` schema), plus what the recipe must mean for
  spot-supervisor: the run id is ``$SKYPILOT_TASK_ID``, the exit code after a notice is
  a valid ``daemon.exit_code_after_notice`` and listed in ``recover_on_exit_codes``, the
  supervisor is ``exec``ed in the foreground, the ladder is the stack's;
- when SkyPilot is installed (``make skypilot-check`` puts it in ``.venv-skypilot``, or
  ``$SKYPILOT_PYTHON`` names an interpreter that has it): SkyPilot's own parser,
  ``sky.Task.from_yaml``. It is kept out of the dev venv because it pins packages of its
  own.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from daemon import config
from daemon.config import RUN_ID_RE

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "deploy" / "skypilot" / "train.yaml"
STACK = REPO / "deploy" / "aws" / "spot-training.yaml"
SUPERVISOR = "/opt/spot-supervisor/venv/bin/spot-supervisor"
# A managed job's task id as SkyPilot sets it: the same on every recovery of the job.
TASK_ID = "sky-managed-2026-11-28-09-00-00-123456_llama-ft_1-0"

# SkyPilot 0.14.1, sky/utils/schemas.py: get_task_schema() and get_resources_schema(),
# their key sets whole, the types of the keys this recipe uses.
_ANY: dict[str, Any] = {}
_RESOURCE_KEYS = [
    "_cluster_config_overrides",
    "_docker_login_config",
    "_is_image_managed",
    "_no_missing_accel_warnings",
    "_requires_fuse",
    "accelerator_args",
    "accelerators",
    "any_of",
    "autostop",
    "cloud",
    "cpus",
    "disk_size",
    "disk_tier",
    "ephemeral_storage",
    "image_id",
    "infra",
    "instance_type",
    "job_recovery",
    "labels",
    "local_disk",
    "max_hourly_cost",
    "memory",
    "network_tier",
    "ordered",
    "ports",
    "priority",
    "priority_class",
    "region",
    "use_spot",
    "volumes",
    "zone",
]
_EXIT_CODE = {"type": "integer", "minimum": 0, "maximum": 255}
_SINGLE_RESOURCES: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **dict.fromkeys(_RESOURCE_KEYS, _ANY),
        "instance_type": {"type": "string"},
        "use_spot": {"type": "boolean"},
        "image_id": {"anyOf": [{"type": "string"}, {"type": "object"}, {"type": "null"}]},
        "job_recovery": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "object",
                    "properties": {
                        "strategy": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                        "max_restarts_on_errors": {"type": "integer", "minimum": 0},
                        "recover_on_exit_codes": {
                            "anyOf": [
                                _EXIT_CODE,
                                {"type": "array", "items": _EXIT_CODE, "uniqueItems": True},
                            ]
                        },
                    },
                },
            ]
        },
    },
}
RESOURCES_SCHEMA: dict[str, Any] = {
    **_SINGLE_RESOURCES,
    "properties": {
        **_SINGLE_RESOURCES["properties"],
        "ordered": {"type": "array", "items": _SINGLE_RESOURCES},
        "any_of": {"type": "array", "items": _SINGLE_RESOURCES},
    },
}
TASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **dict.fromkeys(
            [
                "_metadata",
                "api_server_access",
                "config",
                "event_callback",
                "file_mounts_mapping",
                "inputs",
                "managed_secrets",
                "num_nodes",
                "outputs",
                "pool",
                "secrets",
                "service",
                "volume_mounts",
                "volumes",
                "workdir",
            ],
            _ANY,
        ),
        "name": {"type": "string"},
        "resources": RESOURCES_SCHEMA,
        "file_mounts": {"type": "object"},
        "setup": {"type": "string"},
        "run": {"type": "string"},
        "envs": {
            "type": "object",
            "patternProperties": {"^[a-zA-Z_][a-zA-Z0-9_]*$": {"type": ["string", "null"]}},
            "additionalProperties": False,
        },
    },
}
# The strategies SkyPilot 0.14.1 registers (sky/jobs/recovery_strategy.py).
STRATEGIES = {"FAILOVER", "EAGER_NEXT_REGION"}


def recipe() -> dict[str, Any]:
    doc = yaml.safe_load(RECIPE.read_text())
    assert isinstance(doc, dict)
    return doc


def exports(script: str) -> dict[str, str]:
    """The ``export NAME=value`` lines of a shell script, values as the shell reads them."""
    out = {}
    for line in script.splitlines():
        m = re.match(r"^\s*export ([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if m:
            (value,) = shlex.split(m[2])
            out[m[1]] = value
    return out


def test_recipe_matches_skypilots_schema() -> None:
    doc = recipe()
    jsonschema.validate(doc, TASK_SCHEMA)
    recovery = doc["resources"]["job_recovery"]
    assert recovery["strategy"] in STRATEGIES
    assert doc["resources"]["use_spot"] is True
    assert all(re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", r) for r in doc["resources"]["image_id"])
    assert all(v.startswith("ami-") for v in doc["resources"]["image_id"].values())


def test_recipe_runs_the_supervisor_in_the_foreground_with_the_task_as_run_id() -> None:
    doc = recipe()
    run = doc["run"]
    last = [line for line in run.splitlines() if line.strip()][-1].strip()
    assert last.startswith(f"exec {SUPERVISOR} run --config ")
    env = exports(run)
    assert env["SPOT_SUPERVISOR_RUN_ID"] == "$SKYPILOT_TASK_ID"
    # The environment the supervisor gets, with SkyPilot's task id, is a valid config
    # over any run file: the run id is the task's, the drain exit code is recoverable.
    real = {
        k: v.replace("$SKYPILOT_TASK_ID", TASK_ID).replace("$HOME", "/home/ubuntu")
        for k, v in env.items()
    }
    base = {
        "run": {"id": "from-the-file", "command": ["python", "train.py"]},
        "checkpoints": {"local_dir": "/tmp/ckpt", "remote": "s3://my-bucket/spot-runs"},
    }
    cfg = config.build(base, environ=real)
    assert cfg.run.id == TASK_ID and RUN_ID_RE.match(TASK_ID)
    code = cfg.daemon.exit_code_after_notice
    recover = doc["resources"]["job_recovery"]["recover_on_exit_codes"]
    assert code in (recover if isinstance(recover, list) else [recover])
    # Not 0 (SkyPilot would call the job done), not 1 or 2 (ours for failures).
    assert code not in (0, 1, 2)
    # The AMI's unit must not run beside the job's supervisor.
    assert "systemctl disable --now spot-supervisor.service" in doc["setup"]
    assert doc["file_mounts"]["/opt/spot-supervisor-run/run.toml"] == "${RUN_CONFIG}"
    assert f"--config {'/opt/spot-supervisor-run/run.toml'}" in last


def test_recipe_ladder_is_the_stacks_default_ladder() -> None:
    from cfnlint.decode import decode_str

    stack, _ = decode_str(STACK.read_text())
    assert stack is not None
    ladder = stack["Parameters"]["InstanceTypes"]["Default"].split(",")
    assert [r["instance_type"] for r in recipe()["resources"]["ordered"]] == ladder


def skypilot_python() -> str | None:
    candidate = os.environ.get("SKYPILOT_PYTHON") or str(REPO / ".venv-skypilot" / "bin" / "python")
    return candidate if Path(candidate).exists() else None


def test_skypilots_own_parser_reads_the_recipe() -> None:
    python = skypilot_python()
    if python is None:
        pytest.skip(
            "SkyPilot is not installed (`make skypilot-check` installs it into .venv-skypilot);"
            " test_recipe_matches_skypilots_schema checks the same keys without it"
        )
    probe = (
        "import json, sys, sky\n"
        "t = sky.Task.from_yaml(sys.argv[1])\n"
        "print(json.dumps({'version': sky.__version__, 'envs': t.envs,"
        " 'file_mounts': t.file_mounts, 'resources': [{'type': r.instance_type,"
        " 'spot': r.use_spot, 'image': r.image_id, 'recovery': r.job_recovery}"
        " for r in t.resources]}))\n"
    )
    out = subprocess.run(
        [python, "-c", probe, str(RECIPE)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    resources = parsed["resources"]
    assert [r["type"] for r in resources] == ["p4d.24xlarge", "p3.16xlarge", "g5.48xlarge"]
    assert all(r["spot"] for r in resources)
    assert all(r["recovery"]["recover_on_exit_codes"] == [75] for r in resources)
    assert all(set(r["image"]) == {"us-east-1", "us-west-2"} for r in resources)
    # SkyPilot substitutes the env in file_mounts: the run file travels.
    assert parsed["file_mounts"] == {"/opt/spot-supervisor-run/run.toml": "run.toml"}


@pytest.mark.parametrize(
    ("change", "where"),
    [
        # The seed's key, which SkyPilot has since replaced with job_recovery.
        (lambda d: d["resources"].update(spot_recovery="failover"), "spot_recovery"),
        (lambda d: d["resources"]["job_recovery"].update(recover_on_exit_codes=[300]), "300"),
        (lambda d: d["resources"].update(use_spot="yes"), "'yes'"),
        (lambda d: d.update(envs={"NOT-A-NAME": "x"}), "NOT-A-NAME"),
    ],
)
def test_the_schema_check_refuses_what_skypilot_refuses(change: Any, where: str) -> None:
    doc = recipe()
    change(doc)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(where)):
        jsonschema.validate(doc, TASK_SCHEMA)
