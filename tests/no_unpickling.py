"""Runs a stage script with unpickling refused: `python tests/no_unpickling.py SCRIPT ARGS...`.

pickle.load and pickle.loads raise, so a run that completes never unpickled anything through them (numpy's
np.load(allow_pickle=True) calls pickle.load). DeepSpeed's checkpoints and torch.distributed's object
collectives use pickle.Unpickler on their own files and messages, never on shard content, and are left alone.
"""

import pickle
import runpy
import sys


def refuse(*args, **kwargs):
    raise AssertionError("something tried to unpickle during the run (shard content must never be unpickled)")


pickle.load = pickle.loads = refuse
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
