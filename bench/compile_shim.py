"""PROTOTYPE ONLY (bench/throughput.py --compile): shardtune with ``torch.compile`` monkeypatched in.

shardtune has no ``model.compile`` option. To estimate what one would buy, this shim wraps
``shardtune.train.components.build_model`` so the freshly built model is compiled in place
(``nn.Module.compile()``, before the strategy wraps it), then runs the normal
``shardtune train`` entry point under torchrun. Validation is stubbed out here (it would
compile a second, no-grad graph and it is not part of the measured windows). Nothing in
shardtune is changed; the real option belongs in shardtune's config and strategy setup.

    python -m torch.distributed.run --standalone --nproc-per-node N bench/compile_shim.py train [overrides]
"""

from __future__ import annotations

import math
import sys

import shardtune.train.components as components
import shardtune.train.loop as loop

_build_model = components.build_model


def _build_compiled_model(cfg, tokenizer, *args, **kwargs):
    model = _build_model(cfg, tokenizer, *args, **kwargs)
    model.compile()  # in place: the module keeps its type, _no_split_modules and parameters
    return model


def _no_eval(*args, **kwargs):
    return {"loss": math.nan, "perplexity": math.nan, "tokens": 0.0}


components.build_model = _build_compiled_model
loop.evaluate_loss = _no_eval

if __name__ == "__main__":
    from shardtune.cli import main

    sys.exit(main(sys.argv[1:]))
