"""Redoing a stage loses nothing until the new run has completed: `--overwrite` (or inputs that changed) as a
transaction, and what each stage was built from.

Begin: a journal (RUN_DIR/.overwrite-STAGE.json) is written, then the stage's folder and those of the stages
downstream of it are renamed to NAME.set-aside-overwrite. Commit: when the stage's new manifest is written, the
set-aside folders are removed. Roll back: a rerun that finds the journal and no new manifest (the new run failed,
was killed, ran out of memory) renames them back. A journal left at any point by a kill -9 leads to one of the two.
Only rank 0 moves and restores; the other ranks of its launch wait until it has (`settle`).

Inputs: each stage records the identity (a hash of the manifest) of the upstream manifests it started from, in
its folder's _inputs.json and then its manifest. A stage whose inputs have changed since is not complete: it is
redone in a transaction; a stage that reads an upstream stage built from other inputs than the current ones is
refused (stage 4 never joins new latents with old rewards).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from gigavideo.errors import UserError
from gigavideo.rundir.files import size, write_json_atomic
from gigavideo.rundir.layout import SET_ASIDE, STAGE_SCRIPTS, RunDir

log = logging.getLogger("gigavideo.rundir")

PIPELINE = ("stage1", "stage2", "stage3", "stage4", "eval")  # each reads the outputs of those before it
UPSTREAM = {"stage2": ("stage1",), "stage3": ("stage2",), "stage4": ("stage2", "stage3"), "eval": ("stage4",)}
INPUTS = "_inputs.json"
OVERWRITTEN = f"{SET_ASIDE}overwrite"
SETTLE_WAIT_S = 3600.0


def downstream(stage: str) -> tuple[str, ...]:
    return PIPELINE[PIPELINE.index(stage) + 1 :] if stage in PIPELINE else ()


# How a completion ran, not what it made: a stage rerun that only heals (a manifest rewritten, duplicates set aside)
# keeps its identity, so the stages after it stay valid.
HOW_IT_RAN = ("id", "completed_at", "process_seconds", "device_seconds", "world_size", "set_aside")


def content_id(manifest: dict, run_path: Path) -> str:
    """What identifies what a stage made, written into its manifest as `id` (so that a copied run directory keeps
    it): a hash of the manifest (its shards and sample counts, settings, failures and own inputs), less how it ran
    and where the run directory was."""
    text = json.dumps({k: v for k, v in manifest.items() if k not in HOW_IT_RAN}, sort_keys=True, default=str)
    for where in sorted({str(Path(run_path).resolve()), str(run_path)}, key=len, reverse=True):
        text = text.replace(where, "RUN_DIR")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def manifest_id(run: RunDir, stage: str) -> str | None:
    """The `id` of a stage's manifest (of a manifest written before ids: its bytes' hash); None: not complete."""
    try:
        data = run.manifest(stage).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return str(json.loads(data)["id"])
    except (ValueError, KeyError, TypeError):
        return hashlib.sha256(data).hexdigest()[:16]


def manifest_file_hash(run: RunDir, stage: str) -> str | None:
    try:
        return hashlib.sha256(run.manifest(stage).read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return None


def current_inputs(run: RunDir, stage: str) -> dict:
    return {name: manifest_id(run, name) for name in UPSTREAM.get(stage, ())}


def recorded_inputs(run: RunDir, stage: str) -> dict | None:
    """The inputs a stage was built (or started) from: its manifest's, else its unfinished run's; None if unknown."""
    return read_inputs(run.manifest(stage)) or read_inputs(run.stage(stage) / INPUTS)


def changed_inputs(run: RunDir, stage: str) -> list[str]:
    """The upstream stages that were redone since `stage` was built (or started) from them."""
    recorded = recorded_inputs(run, stage)
    if recorded is None:
        return []
    now = current_inputs(run, stage)
    return [name for name, ident in recorded.items() if now.get(name) is not None and now.get(name) != ident]


def check_upstream_current(run: RunDir, stage: str) -> None:
    """Refuse to read an upstream stage whose own inputs have been redone since it was built."""
    for name in UPSTREAM.get(stage, ()):
        if run.is_complete(name) and (changed := changed_inputs(run, name)):
            raise UserError(
                f"{name} in {run.path} was built from an earlier {', '.join(changed)}, which has been redone since; "
                f"{stage} would join the two. Rerun {STAGE_SCRIPTS[name]} --run_dir {run.path} first (it redoes "
                f"itself), then {stage}."
            )


def record_inputs(run: RunDir, stage: str) -> None:
    write_json_atomic(run.stage(stage) / INPUTS, {"inputs": current_inputs(run, stage)})


def read_inputs(path: Path) -> dict | None:
    """The `inputs` a manifest or an _inputs.json records (None: none, or unreadable)."""
    try:
        inputs = json.loads(Path(path).read_text()).get("inputs")
    except (OSError, ValueError, AttributeError):
        return None
    return inputs if isinstance(inputs, dict) else None


class Overwrite:
    """The transaction of redoing one stage of one run directory."""

    def __init__(self, run: RunDir, stage: str):
        self.run, self.stage = run, stage
        self.journal = run.path / f".overwrite-{stage}.json"

    def aside(self, name: str) -> Path:
        return self.run.path / f"{name}{OVERWRITTEN}"

    def read(self) -> dict | None:
        try:
            return json.loads(self.journal.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # cut short by a kill while written: nothing was moved yet
            return {"stage": self.stage, "moved": [], "old_manifest": None}

    def begin(self, reason: str, run_id: str) -> None:
        """Set aside this stage's outputs and those downstream of it (rank 0, after recover)."""
        for other in self.run.path.glob(".overwrite-*.json"):
            if other != self.journal:
                name = other.name[len(".overwrite-") : -len(".json")]
                raise UserError(
                    f"{name} in {self.run.path} was being redone and did not complete ({other}); rerun "
                    f"{STAGE_SCRIPTS.get(name, name)} first (it restores its old outputs or completes), then "
                    f"{self.stage}"
                )
        names = [n for n in (self.stage, *downstream(self.stage)) if os.path.lexists(self.run.stage(n))]
        self._check_space()
        old = manifest_file_hash(self.run, self.stage)
        write_json_atomic(self.journal, {"stage": self.stage, "moved": names, "old_manifest": old, "run_id": run_id})
        for name in names:  # this stage first: while it is still in place, a rerun rolls back
            os.replace(self.run.stage(name), self.aside(name))
        if names:
            log.info(
                "%s: %s; the old outputs of %s are set aside as NAME%s until the new run completes (a rerun of a "
                "run that fails restores them)",
                self.stage,
                reason,
                ", ".join(names),
                OVERWRITTEN,
            )
        write_json_atomic(self.journal, {**self.read(), "begun": True})

    def _check_space(self) -> None:
        """The new run writes about what the old one did, while the old one is kept."""
        old = self.run.stage(self.stage)
        if not old.is_dir() or old.is_symlink():
            return
        used = sum(p.stat().st_size for p in old.rglob("*") if p.is_file() and not p.is_symlink())
        free = shutil.disk_usage(self.run.path).free
        if used > free:
            raise UserError(
                f"redoing {self.stage} keeps its old outputs ({size(used)}) until the new run completes, and writes "
                f"about as much again, but only {size(free)} are free in {self.run.path}: free space, or remove "
                f"{old} yourself if you will not need it back"
            )

    def recover(self) -> None:
        """Finish what a journal left: commit if the new run completed, else restore the old outputs."""
        journal = self.read()
        if journal is None:
            return
        new = manifest_file_hash(self.run, self.stage)  # this very file, not its content's identity
        if new is not None and new != journal.get("old_manifest"):
            self.commit()
            return
        restored = []
        for name in journal.get("moved", []):
            if os.path.lexists(self.aside(name)):
                target = self.run.stage(name)
                if target.is_symlink() or target.is_file():
                    target.unlink()
                elif target.exists():
                    shutil.rmtree(target)
                os.replace(self.aside(name), target)
                restored.append(name)
        self.journal.unlink(missing_ok=True)
        if restored:
            log.warning(
                "%s: the --overwrite run started before did not complete; restored the old outputs of %s",
                self.stage,
                ", ".join(restored),
            )

    def commit(self) -> None:
        """The new run completed: the set-aside outputs go."""
        journal = self.read()
        if journal is None:
            return
        for name in journal.get("moved", []):
            aside = self.aside(name)
            if aside.is_symlink() or aside.is_file():
                aside.unlink()
            elif aside.exists():
                shutil.rmtree(aside)
        self.journal.unlink(missing_ok=True)
        if journal.get("moved"):
            log.info("%s complete: removed the old outputs of %s", self.stage, ", ".join(journal["moved"]))

    def settled_marker(self) -> Path:
        return self.run.path / ".locks" / f"{self.stage}.settled"

    def mark_settled(self, run_id: str) -> None:
        write_json_atomic(self.settled_marker(), {"run_id": run_id})

    def wait_settled(self, run_id: str, in_array: bool) -> None:
        """Ranks other than 0 wait until rank 0 of their launch has recovered or begun (a job array's tasks, which
        start apart, until no journal is pending)."""
        deadline, said = time.monotonic() + SETTLE_WAIT_S, False
        while time.monotonic() < deadline:
            if in_array and self.read() is None:
                return
            if not in_array:
                try:
                    if json.loads(self.settled_marker().read_text()).get("run_id") == run_id:
                        return
                except (OSError, ValueError):
                    pass
            if not said:
                log.info("%s: waiting for rank 0 to set aside or restore the stage's outputs", self.stage)
                said = True
            time.sleep(0.1)
        raise UserError(f"{self.stage}: rank 0 did not settle {self.run.path} within {SETTLE_WAIT_S:.0f} s")


def commit_if_redone(stage_dir: Path, stage: str) -> None:
    """Called once the stage's manifest is written."""
    stage_dir = Path(stage_dir)
    if stage_dir.parent.joinpath(f".overwrite-{stage}.json").exists():
        Overwrite(RunDir(stage_dir.parent), stage).commit()
