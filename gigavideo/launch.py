"""`python -m gigavideo.launch` is torchrun (the same arguments), except that processes stopping on request (stage
4 after its checkpoint, exit code 3, which slurm/stage4.sh requeues) are one line with that exit code instead of
torch's ChildFailedError traceback. Any other failure keeps torch's report."""

from __future__ import annotations

import sys

STOPPED_ON_REQUEST = 3  # stage4_train/train.py's exit code after a stop request
# torchrun sends SIGTERM to the processes still running once one has exited non-zero: the ranks a little slower
# to exit after the same stop end with it
TERMINATED_BY_TORCHRUN = {-15, 128 + 15}


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        if STOPPED_ON_REQUEST not in codes or not codes <= {STOPPED_ON_REQUEST, *TERMINATED_BY_TORCHRUN}:
            raise
        print(f"launch: the processes stopped on request (exit {STOPPED_ON_REQUEST})", file=sys.stderr)
        sys.exit(STOPPED_ON_REQUEST)


if __name__ == "__main__":
    main()
