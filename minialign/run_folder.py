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
    moving the whole old run (run.json, run_config.json, metrics.jsonl, curves.png, model/,
    checkpoints/) aside into one dated folder, previous-<time>/, rather than deleting any of it.
  * --resume continues only a run that can be continued: a finished run (run.json says so) is
    left untouched (a line says so, exit status 0); a run without a checkpoint, or a folder
    without a run, is refused rather than trained again from scratch over its files.
  * The checks run twice: before any work (`check`), and again under the lock (`claim`), so of
    two runs started together on one empty folder the second refuses instead of overwriting
    the first.
  * Pruning (--save_total_limit) deletes only checkpoints listed in run.json as written by
    this run, never a folder picked by its name; a folder of that name the run did not write
    (a user's copy) is never written into: the checkpoint takes another name beside it.
  * Temporary folders left by a writer that was killed mid-save are removed at start only when
    both the name (`.step-N.tmp-PID`, PID no longer running) and the marker file the writer put
    inside (checkpoint.TEMP_MARKER) say they are minialign's.
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

from .checkpoint import TEMP_MARKER
from .distributed import DistEnv, barrier, broadcast_object
from .errors import NothingToDo, UserError

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
# What a finished or interrupted run leaves in its folder; any of them means "a run lives here".
RUN_MARKERS = (RUN_FILE, "metrics.jsonl", CHECKPOINTS, "model")
# Everything a run writes into its folder; --overwrite moves all of it aside (ref_cache/ stays:
# it is a cache, checked against its settings before use, that a new run may reuse).
RUN_OUTPUTS = (RUN_FILE, "run_config.json", "metrics.jsonl", "curves.png", "model", CHECKPOINTS)
PREVIOUS = "previous-"  # --overwrite's folder for the run it replaces: previous-<time>/
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
    def __init__(self, path, env: DistEnv, script: str | None = None):
        self.path = Path(path)
        self.env = env
        self.script = script  # "train_rm.py" / "train_dpo.py": a run is resumed by the script that started it
        self.checkpoints = self.path / CHECKPOINTS
        self.record: dict = {}
        self._locked = False

    # ------------------------------------------------------------------ before anything runs
    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse, before any work, an --output that holds another run, or a --resume with nothing
        to continue; NothingToDo for a --resume of a finished run (rank 0 decides, all ranks raise)."""
        self._raise(self._refusal(resume, overwrite) if self.env.is_main else None)

    def _raise(self, verdict: tuple[str, str] | None) -> None:
        verdict = broadcast_object(verdict, self.env)
        if verdict is None:
            return
        kind, message = verdict
        if kind == "done":
            raise NothingToDo(message)
        raise UserError(message)

    def _refusal(self, resume: bool, overwrite: bool) -> tuple[str, str] | None:
        """None when the run may go ahead, else ("error" | "done", the line to print)."""
        if self.path.exists() and not self.path.is_dir():
            return "error", f"--output {self.path} is a file, not a folder"
        if resume and overwrite:
            return "error", "--resume and --overwrite contradict each other: continue the run, or start a new one"
        found = [m for m in RUN_MARKERS if (self.path / m).exists()]
        if resume:
            return self._resume_refusal(found)
        if found and not overwrite:
            return "error", (f"--output {self.path} already holds a run ({', '.join(found)}): continue it with "
                             f"--resume if it was interrupted, start a new run there with --overwrite (the old run "
                             f"is moved aside into {PREVIOUS}<time>/, not deleted), or choose another --output")
        return None

    def _resume_refusal(self, found: list[str]) -> tuple[str, str] | None:
        """--resume: continue only a run that stopped early and left a checkpoint."""
        if not found:
            return "error", f"--resume: --output {self.path} holds no run to continue (drop --resume to start one)"
        try:
            record = self._read_record()
        except UserError as e:
            return "error", str(e)
        if record.get("script") and self.script and record["script"] != self.script:
            return "error", (f"--resume: {self.path} holds a {record['script']} run, not a {self.script} one; "
                             f"resume it with {record['script']}, or choose another --output")
        if record.get("finished"):
            return "done", (f"{self.path} holds a finished run (its model is in {self.path / 'model'}): nothing to "
                            f"resume, nothing was changed. To train further, start a new run from that model "
                            f"(another --output, or --overwrite to move this run aside)")
        names = record.get("checkpoints") if record else self._existing_checkpoints()
        if not any((self.checkpoints / n).is_dir() for n in names or []):
            return "error", (f"--resume: the run in {self.path} left no checkpoint to continue from (it saved none: "
                             f"--save_every 0, or it stopped before the first); start it again with --overwrite "
                             f"(its files are moved aside) or choose another --output")
        return None

    # --------------------------------------------------------------------------- taking it
    def claim(self, resume: bool, overwrite: bool, run_config: dict) -> None:
        """Lock the folder, check it again under the lock (another run may have taken it since
        `check`), tidy what killed writers left, record the run (rank 0); all ranks wait."""
        verdict = None
        if self.env.is_main:
            try:  # whatever stops rank 0 here is sent to every rank: none is left waiting for the others
                self.path.mkdir(parents=True, exist_ok=True)
                self._lock()
                verdict = self._refusal(resume, overwrite)
                if verdict is None:
                    self._take(resume, overwrite, run_config)
            except UserError as e:
                verdict = ("error", str(e))
            except OSError as e:  # a read-only folder, a full disk
                verdict = ("error", f"cannot write {e.filename or self.path}: {e.strerror or e}")
            if verdict is not None:
                self.release()
        self._raise(verdict)
        self.record = broadcast_object(self.record, self.env)
        barrier(self.env)

    def _take(self, resume: bool, overwrite: bool, run_config: dict) -> None:
        """Rank 0, holding the lock: start or continue the run's record."""
        self._remove_stale_temp_folders()
        old = self._read_record()
        if resume:
            self.record = old or {"run_id": uuid.uuid4().hex, "checkpoints": self._existing_checkpoints()}
        else:
            if overwrite:
                self._move_previous_run_aside()
            self.record = {"run_id": uuid.uuid4().hex, "checkpoints": []}
        self.record.update(finished=False, pid=os.getpid(), host=socket.gethostname())
        if self.script:
            self.record["script"] = self.script
        self._write_record()
        (self.path / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))

    def _move_previous_run_aside(self) -> None:
        """--overwrite: the old run's files into one new folder previous-<time>/ (never deleted)."""
        present = [name for name in RUN_OUTPUTS if (self.path / name).exists()]
        if not present:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1, 1000):  # mkdir is atomic: two overwrites in one second get two folders
            aside = self.path / (f"{PREVIOUS}{stamp}" + (f"-{n}" if n > 1 else ""))
            try:
                aside.mkdir()
                break
            except FileExistsError:
                continue
        for name in present:
            os.replace(self.path / name, aside / name)
        print(f"--overwrite: the previous run ({', '.join(present)}) was moved to {aside}", flush=True)

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
                ours = m and p.is_dir() and (p / TEMP_MARKER).is_file()  # the name alone could be a user's folder
                if ours and not pid_alive(int(m["pid"])):
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
        if not self.checkpoints.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name))

    def checkpoint_name(self, step: int) -> str:
        """The folder name for this run's checkpoint at `step`: step-000040, or, when a folder of
        that name exists that this run did not write (a user's copy), step-000040-<run id> beside it."""
        name = f"step-{step:06d}"
        if (self.checkpoints / name).exists() and name not in self.record.get("checkpoints", []):
            print(f"warning: {self.checkpoints / name} was not written by this run and is left as it is; "
                  f"this checkpoint goes to {name}-{self.run_id[:8]}", flush=True)
            name = f"{name}-{self.run_id[:8]}"
        return name

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


__all__ = ["RunFolder", "RUN_FILE", "LOCK_FILE", "CHECKPOINTS", "LATEST", "RUN_OUTPUTS"]
