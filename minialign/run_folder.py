"""A run folder, and the rules that keep a user's work in it safe.

    OUTPUT/
      run.json          who owns the folder: run id, whether it finished, and the checkpoints
                        this run wrote, oldest first (the only ones it will ever prune)
      .lock             pid and host of the process writing here now
      run_config.json   the resolved settings; metrics.jsonl, curves.png, model/
      checkpoints/      step-000040/ ... and `latest`, a one-line pointer (resume.py)

The rules:
  * A new run refuses a folder that holds another run (its run.json, metrics, checkpoints or
    model) unless told what to do: --resume continues that run; --overwrite starts a new one,
    moving the old checkpoints aside (to checkpoints.before-<time>/) rather than deleting them.
  * Pruning (--save_total_limit) deletes only checkpoints listed in run.json as written by
    this run, never a folder picked by its name.
  * Temporary folders left by a writer that was killed mid-save (`.step-N.tmp-PID`, PID no
    longer running) are removed at start.
  * A lock file stops a second run on the same folder; its message names the holder's pid.
  * Nothing is written until `claim()`, which the scripts call once data and models have
    loaded: a start that fails leaves the folder as it was.

Only rank 0 touches the folder; the other ranks learn its answers by broadcast.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

from .distributed import DistEnv, barrier, broadcast_object
from .errors import UserError

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
# What a finished or interrupted run leaves in its folder; any of them means "a run lives here".
RUN_MARKERS = (RUN_FILE, "metrics.jsonl", CHECKPOINTS, "model")
TEMP_FOLDER = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)$")  # checkpoint.atomic_directory's names


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunFolder:
    def __init__(self, path, env: DistEnv):
        self.path = Path(path)
        self.env = env
        self.checkpoints = self.path / CHECKPOINTS
        self.record: dict = {}
        self._locked = False

    # ------------------------------------------------------------------ before anything runs
    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse, before any work, an --output that holds another run (rank 0 decides)."""
        message = self._refusal(resume, overwrite) if self.env.is_main else None
        message = broadcast_object(message, self.env)
        if message:
            raise UserError(message)

    def _refusal(self, resume: bool, overwrite: bool) -> str | None:
        if self.path.exists() and not self.path.is_dir():
            return f"--output {self.path} is a file, not a folder"
        if resume and overwrite:
            return "--resume and --overwrite contradict each other: continue the run, or start a new one"
        found = [m for m in RUN_MARKERS if (self.path / m).exists()]
        if found and not (resume or overwrite):
            return (f"--output {self.path} already holds a run ({', '.join(found)}): continue it with --resume, "
                    f"start a new run there with --overwrite (its checkpoints are moved aside, not deleted), "
                    f"or choose another --output")
        return None

    # --------------------------------------------------------------------------- taking it
    def claim(self, resume: bool, overwrite: bool, run_config: dict) -> None:
        """Lock the folder, tidy what killed writers left, record the run (rank 0); all ranks wait."""
        if self.env.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
            self._remove_stale_temp_folders()
            old = self._read_record()
            if resume and (old or self.checkpoints.is_dir()):
                self.record = old or {"run_id": uuid.uuid4().hex, "checkpoints": self._existing_checkpoints()}
            else:
                if overwrite and self.checkpoints.exists():
                    aside = self.path / f"{CHECKPOINTS}.before-{time.strftime('%Y%m%d-%H%M%S')}"
                    os.replace(self.checkpoints, aside)
                    print(f"--overwrite: the previous run's checkpoints were moved to {aside}", flush=True)
                self.record = {"run_id": uuid.uuid4().hex, "checkpoints": []}
            self.record.update(finished=False, pid=os.getpid(), host=socket.gethostname())
            self._write_record()
            (self.path / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))
        self.record = broadcast_object(self.record, self.env)
        barrier(self.env)

    def _lock(self) -> None:
        lock = self.path / LOCK_FILE
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(lock.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1))):
                    lock.unlink(missing_ok=True)  # its process is gone: the lock is stale
                    continue
                raise UserError(
                    f"--output {self.path} is in use by another run (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}): wait for it to finish or choose another --output "
                    f"(if no such run exists, delete {lock})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._locked = True
            atexit.register(self.release)
            return
        raise UserError(f"could not take the lock {lock}")

    def release(self) -> None:
        """Remove our lock (called at exit too; harmless twice)."""
        if self._locked:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self._locked = False

    def _remove_stale_temp_folders(self) -> None:
        for folder in (self.path, self.checkpoints):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                m = TEMP_FOLDER.match(p.name)
                if m and p.is_dir() and not pid_alive(int(m["pid"])):
                    shutil.rmtree(p, ignore_errors=True)
                    print(f"removed {p}, left by a writer that was stopped mid-save", flush=True)

    # ---------------------------------------------------------------------------- the record
    def _read_record(self) -> dict:
        path = self.path / RUN_FILE
        if not path.is_file():
            return {}
        try:
            record = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"{path} is not valid JSON ({e}); restore it, or start a new run with --overwrite") from None
        if not isinstance(record, dict) or not isinstance(record.get("checkpoints"), list):
            raise UserError(f"{path} is not a minialign run record; restore it, or start over with --overwrite")
        return record

    def _write_record(self) -> None:
        tmp = self.path / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=2))
        os.replace(tmp, self.path / RUN_FILE)

    def _existing_checkpoints(self) -> list[str]:
        """A folder from before run.json existed: its step-* checkpoints are the run's, oldest first."""
        return sorted(p.name for p in self.checkpoints.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name))

    @property
    def run_id(self) -> str | None:
        return self.record.get("run_id")

    def add_checkpoint(self, name: str, keep: int) -> None:
        """Record a checkpoint this run wrote, point `latest` at it, and prune this run's older
        checkpoints beyond `keep` (0: keep all). Rank 0 only."""
        latest = self.checkpoints / LATEST
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(name)
        os.replace(tmp, latest)  # atomic: a reader sees the old or the new pointer, never half
        ours = [c for c in self.record["checkpoints"] if c != name] + [name]
        doomed = ours[:-keep] if keep else []
        self.record["checkpoints"] = [c for c in ours if c not in doomed]
        self._write_record()  # the record first: a kill mid-prune leaves no listed folder missing
        for old in doomed:
            shutil.rmtree(self.checkpoints / old, ignore_errors=True)

    def checkpoint_candidates(self) -> list[Path]:
        """This run's checkpoints to resume from, newest first: `latest`, then the others."""
        names = list(reversed(self.record.get("checkpoints", [])))
        latest = self.checkpoints / LATEST
        if latest.is_file():
            pointed = latest.read_text().strip()
            names = [pointed] + [n for n in names if n != pointed]
        return [self.checkpoints / n for n in names]

    def latest_checkpoint_name(self) -> str | None:
        names = self.record.get("checkpoints") or []
        return names[-1] if names else None

    def finish(self) -> None:
        """Mark the run complete (rank 0)."""
        if self.env.is_main:
            self.record["finished"] = True
            self._write_record()


__all__ = ["RunFolder", "RUN_FILE", "LOCK_FILE", "CHECKPOINTS", "LATEST"]
