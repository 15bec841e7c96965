"""One checkpoint written by every rank of a job that may span several nodes.

Each node (instance) has its own ``$SPOT_CHECKPOINT_DIR`` on its own disk, so each
node's checkpoint directory holds only what that node's ranks wrote: replicated state
(model, optimizer, scheduler, progress, rank 0's RNG) from global rank 0, each other
rank's own RNG (``rng-rank<5 digits>.pt``), and every rank's DCP shards
(:mod:`trainer.sharded`). Each node's leader (its lowest global rank) builds the node's
``.tmp-step-<9 digits>-*`` directory in its ``local_dir`` by the rules of CONTRACT §4,
the node's ranks write into it, and the leader commits ``step-<9 digits>/`` with a
manifest listing exactly the node's files and these extra keys:

* ``ranks``: the global ranks whose files it holds (the node's ranks), sorted;
* ``world_size``: ranks in the job;
* ``node``: the node key (torchrun's ``GROUP_RANK`` as a string, else the hostname);
* ``incarnation``: torchrun's rendezvous id (``TORCHELASTIC_RUN_ID``, else
  ``PET_RDZV_ID``), when there is one: the supervisors merge only parts of one
  incarnation (CONTRACT §7), so two starts that reached one step never mix;
* ``save_seconds``: how long the save took on that node.

On one node with several ranks that is the checkpoint as before (all ranks' files, one
manifest), with ``ranks`` listing them all. Several nodes' directories of one step
together make the run's checkpoint; the supervisors put them together in storage.

The protocol, on the ``io`` process group (every rank runs it for the same step; each
step's decision is taken from gathered values, so all ranks take it alike, and a failure
anywhere fails the save on every rank, no rank left waiting):

1. opening: each leader reports its node's complete checkpoint of the step ("exists"),
   or the ``.tmp-`` directory it made, or its error (all_gather). All exist: nothing is
   written. Some exist and some not (one node kept a part of a save never committed
   everywhere): those leaders set theirs aside and make a ``.tmp-`` directory too
   (a second all_gather), so no step mixes two saves;
2. every rank writes its files into its node's ``.tmp-`` directory, then (when sharded
   state is tracked, collectively) its DCP files;
3. all_gather of each rank's (path, size, sha256) list, or its error;
4. each leader lists its node's files in the manifest and commits;
5. all_gather of the commits' outcomes: when one node failed, the nodes that committed
   set their directory aside again, and every rank raises :class:`CheckpointError`
   naming the rank and node.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from daemon.layout import (
    CheckpointWriter,
    FileEntry,
    HashingWriter,
    Manifest,
    step_dir_name,
    write_file,
)
from trainer.distributed import Ranks
from trainer.errors import CheckpointError, first_line

log = logging.getLogger("trainer.nodes")

OpenFile = Callable[[str], AbstractContextManager[HashingWriter]]

# A node's report at the opening: ("exists", Manifest) | ("tmp", dir name) | ("error", text).
_Opening = tuple[str, Any]


# torchrun gives every worker its rendezvous id (the run id of its elastic agent);
# the supervisor hands one to torchrun through the second (CONTRACT §7).
INCARNATION_ENVS = ("TORCHELASTIC_RUN_ID", "PET_RDZV_ID")


def node_extra(ranks: Ranks) -> dict[str, Any]:
    """The manifest keys that say whose files a node's checkpoint holds, and from which start."""
    extra: dict[str, Any] = {
        "ranks": ranks.node_ranks,
        "world_size": ranks.world_size,
        "node": ranks.node,
    }
    incarnation = next((v for e in INCARNATION_ENVS if (v := os.environ.get(e, ""))), "")
    if incarnation:
        extra["incarnation"] = incarnation
    return extra


def is_partial(manifest: Manifest) -> bool:
    """True when a manifest holds the files of only some of its job's ranks.

    That is one node's part of a multi-node save: a resume point only once the
    supervisor has put every node's part together (``ranks`` then lists them all).
    Manifests without ``ranks`` (one process, or written before nodes) are whole.
    """
    ranks, world = manifest.extra.get("ranks"), manifest.extra.get("world_size")
    if not isinstance(ranks, list) or not isinstance(world, int):
        return False
    return set(ranks) != set(range(world))


def _serves(manifest: Manifest, ranks: Ranks) -> bool:
    """Whether an existing checkpoint holds this node's files for this job."""
    held, world = manifest.extra.get("ranks"), manifest.extra.get("world_size")
    if held is None and world is None:
        return ranks.node_count == 1  # the format before nodes: one machine, all ranks
    if world != ranks.world_size or not isinstance(held, list):
        return False
    return set(ranks.node_ranks) <= set(held)


def _who(ranks: Ranks, rank: int) -> str:
    return f"rank {rank} (node {ranks.nodes[rank]!r})"


def save_per_node(
    ranks: Ranks,
    directory: Path,
    run_id: str,
    step: int,
    reason: str,
    started: float,
    *,
    existing: Callable[[Path, int], Manifest | None],
    set_aside: Callable[[Path, int], None],
    write_files: Callable[[OpenFile], list[FileEntry]],
    write_sharded: Callable[[Path], list[FileEntry]] | None,
    active: set[Path],
) -> tuple[Manifest, bool]:
    """Run the protocol for ``step``; this node's manifest, and False when it existed.

    ``existing`` returns a usable complete checkpoint at a path (clearing a broken one),
    ``set_aside`` removes a complete one, ``write_files`` writes this rank's plain files
    through the given opener, ``write_sharded`` (collective; None when nothing is
    sharded) writes this rank's DCP files into a ``.tmp-`` directory. ``active`` holds
    the ``.tmp-`` directories being written, which the stale sweep leaves alone.
    """
    final_dir = directory / step_dir_name(step)
    failed = f"saving {final_dir.name} failed"
    writer: CheckpointWriter | None = None

    def open_tmp() -> _Opening:
        nonlocal writer
        w = CheckpointWriter(directory, run_id, step, reason)
        w.__enter__()
        active.add(w.tmp_dir)
        writer = w
        return ("tmp", w.tmp_dir.name)

    def first_opening() -> _Opening | None:
        if not ranks.is_leader:
            return None
        try:
            found = existing(final_dir, step)
            if found is not None:
                if _serves(found, ranks):
                    return ("exists", found)
                log.warning(
                    "setting aside %s: it holds ranks %s of a world of %s, not this node's %s",
                    final_dir,
                    found.extra.get("ranks"),
                    found.extra.get("world_size"),
                    ranks.node_ranks,
                )
                set_aside(final_dir, step)
            return open_tmp()
        except Exception as exc:
            return ("error", first_line(exc))

    def leader_errors(reports: list[tuple[str, Any] | None]) -> list[str]:
        """The ("error", text) reports of the leaders, each naming its rank and node."""
        return [
            f"{_who(ranks, r)}: {rep[1]}"
            for r in ranks.leaders
            if (rep := reports[r]) is not None and rep[0] == "error"
        ]

    def check(openings: list[_Opening | None]) -> None:
        errors = leader_errors(openings)
        if errors:
            raise CheckpointError(f"{failed}: {'; '.join(errors)}")

    try:
        openings: list[_Opening | None] = ranks.gather(first_opening())
        check(openings)
        kinds = {op[0] for r in ranks.leaders if (op := openings[r]) is not None}
        mine = openings[ranks.leader]
        assert mine is not None
        if kinds == {"exists"}:
            return mine[1], False
        if "exists" in kinds:
            again: _Opening | None = mine if ranks.is_leader else None
            if ranks.is_leader and mine[0] == "exists":
                log.warning(
                    "setting aside %s: other nodes have no part of step %d, so it is "
                    "written again on every node",
                    final_dir,
                    step,
                )
                try:
                    set_aside(final_dir, step)
                    again = open_tmp()
                except Exception as exc:
                    again = ("error", first_line(exc))
            openings = ranks.gather(again)
            check(openings)
            mine = openings[ranks.leader]
            assert mine is not None
        tmp_dir = directory / str(mine[1])

        entries: list[FileEntry] = []
        problem: str | None = None
        try:
            if writer is not None:
                write_files(writer.open_file)  # the writer lists them itself
            else:
                entries = write_files(lambda name: write_file(tmp_dir, name))
        except Exception as exc:
            problem = f"{_who(ranks, ranks.rank)}: {first_line(exc)}"
        if write_sharded is not None:
            # Collective: every rank takes part even after its own files failed.
            try:
                entries += write_sharded(tmp_dir)
            except Exception as exc:
                problem = problem or f"{_who(ranks, ranks.rank)}: {first_line(exc)}"
        reports: list[tuple[list[FileEntry], str | None]] = ranks.gather((entries, problem))
        problems = [p for _, p in reports if p]
        if problems:
            raise CheckpointError(f"{failed}: {'; '.join(problems)}")

        outcome: tuple[str, Any] | None = None
        if writer is not None:
            try:
                for r in ranks.node_ranks:
                    writer.add_files(reports[r][0])
                writer.extra["save_seconds"] = round(time.monotonic() - started, 3)
                writer.extra.update(node_extra(ranks))
                outcome = ("ok", writer.commit())
            except Exception as exc:
                outcome = ("error", first_line(exc))
        outcomes: list[tuple[str, Any] | None] = ranks.gather(outcome)
        errors = leader_errors(outcomes)
        if errors:
            if writer is not None and writer.committed:
                # This node's part of a step that is not complete everywhere: never a
                # resume point, and it would block this step's next save on this node.
                try:
                    set_aside(final_dir, step)
                except OSError as exc:
                    log.warning("could not set aside %s: %s", final_dir, exc)
            raise CheckpointError(f"{failed}: {'; '.join(errors)}")
        result = outcomes[ranks.leader]
        assert result is not None
        return result[1], True
    finally:
        if writer is not None:
            active.discard(writer.tmp_dir)
            if not writer.committed:
                shutil.rmtree(writer.tmp_dir, ignore_errors=True)
