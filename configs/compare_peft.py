"""Every PEFT method on the demo task, from the same pretrained base, side by side.

    python launch.py --config=configs/compare_peft.py --workdir=runs/compare_peft

Reuse the base of an earlier demo run with `--config.demo.base_dir=runs/demo/base`. Writes
WORKDIR/summary.json and WORKDIR/table.md: trainable params, optimizer-state bytes, training
tokens/s, eval loss and task accuracy per method (hyperparameters: `--config.peft.*`).
"""

from configs.demo import get_config as demo_config


def get_config(arg=None):
    c = demo_config(arg)
    # (name, method, learning rate): each method at a learning rate it is usually trained with.
    c.demo.stages = [("full", "full", 5e-4), ("lora", "lora", 2e-3), ("dora", "dora", 2e-3),
                     ("ia3", "ia3", 1e-2), ("adapter", "adapter", 2e-3),
                     ("prompt", "prompt", 3e-2), ("ptuning", "ptuning", 1e-2),
                     ("prefix", "prefix", 1e-2)]
    return c
