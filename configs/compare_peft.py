"""Every PEFT method on the demo task, from the same pretrained base, side by side.

    python launch.py --config=configs/compare_peft.py --workdir=runs/compare_peft

Reuse the base of an earlier demo run with `--config.demo.base_dir=runs/demo/base`. Writes
WORKDIR/summary.json and WORKDIR/table.md: trainable params, optimizer-state bytes, training
tokens/s, eval loss and task accuracy per method (hyperparameters: `--config.peft.*`).
"""

from configs.demo import get_config as demo_config
from ptjax import peft


def get_config(arg=None):
    c = demo_config(arg)
    # (name, method, learning rate): every method at the rate it is usually trained with.
    c.demo.stages = [(name, name, m.default_lr, "") for name, m in peft.METHODS.items()]
    c.demo.rlhf.after = ""  # no RLHF stages here
    return c
