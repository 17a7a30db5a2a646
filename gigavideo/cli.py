"""What every stage script does around its work: config, run directory, skip-if-done, clean errors."""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import signal
import sys
from pathlib import Path

from gigavideo.config import Section, defaults, docs, load_config, parse_bool, to_json
from gigavideo.distributed import rank_and_world
from gigavideo.errors import ConfigError, UserError
from gigavideo.rundir.completion import RUN_ID, set_aside_unreadable_manifest
from gigavideo.rundir.files import DISK_FULL, disk_full_message, writing_to
from gigavideo.rundir.layout import RunDir, StageNotReady
from gigavideo.rundir.locks import StageLocked, acquire
from gigavideo.rundir.transaction import Overwrite, changed_inputs, check_upstream_current, record_inputs

log = logging.getLogger("gigavideo")
# Faults of the input, printed as one line. Not ValueError: a bug that raises one must show where.
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)  # a run directory this user cannot write
USER_ERRORS = (UserError, StageNotReady, FileNotFoundError, FloatingPointError, StageLocked)


def setup_logging() -> None:
    rank, world = rank_and_world()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(
        level=os.environ.get("GIGAVIDEO_LOG", "INFO"),
        stream=sys.stderr,
        format=f"%(asctime)s {prefix}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def start_stage(
    stage: str, section: str, run_dir: str, config: str, overwrite: bool, overrides: dict, preflight=None
) -> tuple[Section, RunDir, object] | None:
    """Load the config; return None when the stage is already complete (and not --overwrite).

    `preflight(cfg, run)` checks the inputs (previous stage, model paths) and returns what it resolved; it runs
    before --overwrite sets anything aside. Then rank 0 sets aside the stage's old outputs where it is redone
    (--overwrite, or inputs redone since it was built), as a transaction (gigavideo/rundir/transaction.py): they
    are removed once the new run completes and restored by a plain rerun if it does not. Before all of it, this
    process takes the stage's lock for its rank (gigavideo/rundir/locks.py): a second process on the same stage
    and rank refuses to start, and so cannot --overwrite the first one's work.
    """
    setup_logging()
    # SIGTERM (scancel, preemption, node drain) unwinds like an error: the shard being written stays a .tmp
    # (a rerun redoes its samples) and the lock is released. Stage 4 checkpoints first (StopRequest).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub: weights come from local paths
    cfg = load_config(config, section, overrides)
    run = run_directory(run_dir)
    rank, world = rank_and_world()
    array = "SLURM_ARRAY_JOB_ID" in os.environ and world > 1  # tasks that start apart: none waits for another
    redo = Overwrite(run, stage)
    acquire(run.path, stage, rank)
    if rank == 0:
        redo.recover()  # an --overwrite that did not complete: its old outputs back (or its new ones kept)
    elif world > 1 and (overwrite or redo.read() is not None or changed_inputs(run, stage)):
        redo.wait_settled(RUN_ID, array)  # until rank 0 has recovered, and set aside what it redoes
    changed = changed_inputs(run, stage)
    if run.is_complete(stage) and not overwrite and not changed and set_aside_unreadable_manifest(run, stage) is None:
        log.info(
            "%s already complete in %s (%s exists); skipping. Pass --overwrite to redo it.",
            stage,
            run.path,
            run.manifest(stage),
        )
        if rank == 0 and world > 1 and not array:
            redo.mark_settled(RUN_ID)
        return None
    reason = "--overwrite" if overwrite else f"{', '.join(changed)} redone since it was built" if changed else None
    if array and reason:
        raise UserError(
            f"{stage} in a job array ({reason}): its tasks start at different times, so one would set aside what the "
            f"others wrote. Remove {run.stage(stage)} first (or run it once without the array), then submit the array."
        )
    writing_to(run.stage(stage))
    check_upstream_current(run, stage)
    checked = preflight(cfg, run) if preflight else None
    if rank == 0:
        if reason:
            redo.begin(reason, RUN_ID)
        run.stage(stage).mkdir(parents=True, exist_ok=True)
        record_inputs(run, stage)
        if world > 1 and not array:
            redo.mark_settled(RUN_ID)
    log.info("%s: run dir %s, preset %s", stage, run.path, cfg.preset)
    log.debug("config:\n%s", to_json(cfg))
    return cfg, run, checked


def run_directory(run_dir: str) -> RunDir:
    """--run_dir, refused where it is empty (which would write into this folder) or names a file."""
    if not str(run_dir).strip():
        raise UserError("--run_dir is empty: name the run directory (an empty one would write into this folder)")
    run = RunDir(run_dir)
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"--run_dir {run.path} is a file, not a directory")
    return run


def _exit_on_sigterm(signum, _frame):
    log.warning("received SIGTERM: stopping; a rerun resumes where this left off")
    sys.exit(128 + signum)


FLAG_DOCS = {
    "run_dir": "the run directory shared by all stages",
    "config": "a preset name in configs/ or a TOML file",
    "preset": "a preset name in configs/ or a TOML file",
    "overwrite": "redo the stage even if it is complete (stage 4: start over, not resume)",
}


def print_help(main, section: str | None) -> None:
    """Fire cannot list **overrides, so --help prints the docstrings, main's own flags and, where main takes config
    keys, those of its section and [model]: exactly the flags the script accepts."""
    params = inspect.signature(main).parameters
    own = [p for p in params.values() if p.kind is not p.VAR_KEYWORD]
    takes_keys = section is not None and len(own) < len(params)
    print((sys.modules[main.__module__].__doc__ or "").strip(), "\n")
    usage = " ".join(f"[--{p.name}=...]" for p in own) + (" [--KEY=VALUE ...]" if takes_keys else "")
    print(f"usage: python {sys.argv[0]} {usage}\n")
    print((main.__doc__ or "").strip(), "\n")
    for p in own:
        print(f"  --{p.name}={p.default!r}  {FLAG_DOCS.get(p.name, '')}".rstrip())
    if not takes_keys:
        return
    print("  --KEY=VALUE  any key below; --SECTION.KEY=VALUE or --model_KEY=VALUE names the section\n")
    preset_flag = "config" if "config" in params else "preset"
    preset = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{preset_flag}=")), None)
    preset = preset or params[preset_flag].default
    cfg = load_config(preset, section)
    for table in dict.fromkeys((section, "model")):
        print(f"[{table}] keys: --KEY=DEFAULT  doc  (the value in preset {preset} where it differs)")
        doc = docs(table)
        for key, default in defaults(table).items():
            differs = f"  (preset {preset}: {cfg[table][key]!r})" if cfg[table][key] != default else ""
            print(f"  --{key}={default!r}  {doc[key]}{differs}")
        print()


def checked_flags(main):
    """main, with its own flags held to their defaults' types before it runs: fire passes `--overwrite=false` on
    as the text 'false', which is true."""

    @functools.wraps(main)
    def call(*args, **kwargs):
        signature = inspect.signature(main)
        bound = signature.bind(*args, **kwargs)
        for name, value in list(bound.arguments.items()):
            param = signature.parameters[name]
            default = param.default
            if param.kind is param.VAR_KEYWORD or default is inspect.Parameter.empty or default is None:
                continue
            if isinstance(default, bool):
                bound.arguments[name] = parse_bool(value, name)
            elif isinstance(default, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"--{name}={value!r}: must be a number like {default!r}")
            elif isinstance(default, int) and not isinstance(value, int):
                raise ConfigError(f"--{name}={value!r}: must be a whole number")
            elif isinstance(default, str) and isinstance(value, (int, float)):  # --run_dir=2024 is a name
                bound.arguments[name] = str(value)
        return main(*bound.args, **bound.kwargs)

    return call


def run_cli(main, section: str | None = None) -> None:
    """fire.Fire(main), with user errors printed as one clear line instead of a traceback. section: the config
    section whose keys main takes as **overrides (its --help lists them)."""
    import fire

    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print_help(main, section)
        return
    try:
        fire.Fire(checked_flags(main))
    except USER_ERRORS as err:
        if os.environ.get("GIGAVIDEO_DEBUG"):
            raise
        close_progress_bars()
        print(f"error: {err}\n(set GIGAVIDEO_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in (*DISK_FULL, *NOT_WRITABLE) or os.environ.get("GIGAVIDEO_DEBUG"):
            raise
        close_progress_bars()
        if err.errno in DISK_FULL:
            print(f"error: {disk_full_message(err, run_dir_argument())}", file=sys.stderr)
        else:
            where = f" {err.filename}" if err.filename else f" under {run_dir_argument()}"
            print(f"error: cannot write{where}: {err.strerror}; check the run directory's permissions", file=sys.stderr)
        sys.exit(2)


def close_progress_bars() -> None:
    """So that the error is the last line, not a progress bar redrawn after it."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def run_dir_argument() -> Path:
    """--run_dir as given on the command line (the stage scripts' default otherwise)."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg.startswith("--run_dir="):
            return Path(arg.split("=", 1)[1])
        if arg == "--run_dir" and i + 1 < len(args):
            return Path(args[i + 1])
    return Path("runs/demo")


def pick_device(name: str):
    import torch

    from gigavideo.distributed import device_for_rank

    if name == "auto":
        return device_for_rank()
    return torch.device(name)
