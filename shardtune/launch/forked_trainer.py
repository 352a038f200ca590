"""What torchrun runs in each forked worker (``--run-path`` with ``--start-method=fork``):
``shardtune train`` with this script's arguments. See ``shardtune.launch.forked``."""

import sys

from shardtune.launch.forked import run_trainer

if __name__ == "__main__":  # torchrun runs it as __main__; an import (docs tools) must not train
    run_trainer(sys.argv[1:])
