"""`python -m gigavideo.launch` is torchrun (the same arguments), except that processes stopping on request (stage
4 after its checkpoint, exit code 3, which slurm/stage4.sh requeues) or on a user error (exit code 2, its one-line
message printed by the process) are one line with that exit code instead of torch's ChildFailedError traceback.
Any other failure keeps torch's report."""

from __future__ import annotations

import sys

STOPPED_ON_REQUEST = 3  # stage4_train/train.py's exit code after a stop request
USER_ERROR = 2  # gigavideo.cli.run_cli's, after the one line saying what to fix
OUTCOMES = {STOPPED_ON_REQUEST: "stopped on request", USER_ERROR: "stopped on a user error (the message above)"}
# torchrun sends SIGTERM to the processes still running once one has exited non-zero: the ranks a little slower
# to exit after the same stop end with it
TERMINATED_BY_TORCHRUN = {-15, 128 + 15}


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()} - TERMINATED_BY_TORCHRUN
        if len(codes) != 1 or next(iter(codes)) not in OUTCOMES:
            raise
        code = next(iter(codes))
        print(f"launch: the processes {OUTCOMES[code]} (exit {code})", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
