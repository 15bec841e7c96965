"""The training command as an unprivileged user: ``run.user`` (and ``run.group``).

The supervisor stays root: it owns the runtime and state dirs, talks to systemd, and
SIGKILLs the trainer's whole tree at the drain deadline. Only the child drops its
privileges, between fork and exec (``subprocess.Popen``'s ``user``, ``group`` and
``extra_groups``), with the supplementary groups login would give the user (``video``,
``render``: the GPU's device nodes on some images). What the trainer must use is handed
to it: the checkpoint dir, with everything a restore put there, becomes the user's.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from daemon.config import Config

log = structlog.get_logger(__name__)

# Bits of CapEff in /proc/self/status: switching uid and groups needs both.
_CAP_SETGID = 6
_CAP_SETUID = 7


class IdentityError(LookupError):
    """``run.user`` or ``run.group`` cannot be used on this machine; ``key`` names which."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class RunAs:
    """Who the training command runs as, resolved from the passwd and group databases."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary, as login would set them (includes the gid)
    home: str

    def environ(self) -> dict[str, str]:
        """What login sets: the trainer's caches (~/.cache, ~/.triton) go to its own home."""
        return {"HOME": self.home, "USER": self.user, "LOGNAME": self.user}

    def describe(self) -> str:
        groups = ",".join(str(g) for g in self.groups)
        return f"{self.user} (uid {self.uid}, gid {self.gid}, groups {groups})"


def resolve(user: str, group: str | None = None) -> RunAs:
    """Look the user (and group) up; IdentityError naming the key when one is unknown."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise IdentityError(
            "run.user", f"no user {user!r} on this machine (getent passwd {user})"
        ) from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise IdentityError(
                "run.group", f"no group {group!r} on this machine (getent group {group})"
            ) from None
    # The user's own primary group and every group that lists it, as initgroups() would.
    groups = tuple(sorted(set(os.getgrouplist(user, pw.pw_gid))))
    return RunAs(user, pw.pw_uid, gid, groups, pw.pw_dir)


def can_switch() -> bool:
    """Whether this process may set another uid and groups (CAP_SETUID and CAP_SETGID).

    Root has both unless a unit's CapabilityBoundingSet= took them away.
    """
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return os.geteuid() == 0
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            caps = int(line.split()[1], 16)
            return all(caps >> bit & 1 for bit in (_CAP_SETUID, _CAP_SETGID))
    return os.geteuid() == 0


def hand_over(path: Path, who: RunAs) -> None:
    """Create ``path`` if needed and make it, and everything under it, ``who``'s.

    A restore writes as root; the trainer must read what was restored, write new
    checkpoints beside it and prune old ones. Root walks a dir the user controls, so the
    walk is fd-relative and follows no link: a symlink planted there (to /etc, say) is
    changed itself, never its target, and a hard link to a file of someone else's is left.
    """
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, who.uid, who.gid, follow_symlinks=False)
    for _dir, dirs, files, dirfd in os.fwalk(path, follow_symlinks=False):
        for name in (*dirs, *files):
            try:
                _hand_over_entry(name, dirfd, who)
            except FileNotFoundError:
                continue  # gone meanwhile: nothing to hand over


def _hand_over_entry(name: str, dirfd: int, who: RunAs) -> None:
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if (st.st_uid, st.st_gid) == (who.uid, who.gid):
        return
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        # Nothing here makes hard links; one may point at a file outside the dir.
        log.warning("hand_over_skipped_hard_link", name=name, links=st.st_nlink)
        return
    os.chown(name, who.uid, who.gid, dir_fd=dirfd, follow_symlinks=False)


def unreadable_for(path: Path, who: RunAs) -> Path | None:
    """The first dir on the way to ``path`` that ``who`` may not search, else None.

    Checked on the mode bits (not ACLs), for a warning only: the trainer could not read
    the notice file there.
    """
    for d in reversed(path.parents):
        try:
            st = d.stat()
        except OSError:
            return None  # not created yet: the supervisor creates it searchable
        if st.st_uid == who.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in who.groups or st.st_gid == who.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return d
    return None


def prepare_for(cfg: Config) -> RunAs | None:
    """Before each start of the training command: who it runs as (None: as we do).

    Hands ``checkpoints.local_dir`` to the user, and warns when the notice file's dir
    is not searchable for it. IdentityError when the user or group has gone since the
    config was checked; OSError when the dir cannot be handed over.
    """
    if cfg.run.user is None:
        return None
    who = resolve(cfg.run.user, cfg.run.group)
    hand_over(cfg.checkpoints.local_dir, who)
    blocked = unreadable_for(cfg.notice_file, who)
    if blocked is not None:
        log.warning(
            "notice_file_unreadable_for_trainer",
            user=who.user,
            path=str(cfg.notice_file),
            blocked_at=str(blocked),
        )
    return who
