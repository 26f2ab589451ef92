"""ptjax entry point: runs the trainer a config names.

    python launch.py --config=configs/demo.py --workdir=runs/demo
    python launch.py --config=configs/sft.py --workdir=runs/sft --config.train.steps=500

`--config.a.b=value` overrides any config key; a key that does not exist is an error naming it.
Rerunning the same command resumes from the newest checkpoint in WORKDIR.
"""

from ptjax import runtime

runtime.reexec_with_fast_allocator()  # must happen before JAX starts

import re  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "host:port of process 0 for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config", "workdir"])


def trainers():
    """Config `trainer` name -> the run function (imported lazily: startup stays fast)."""
    from ptjax.recipes import (chat_task, compare_alignment, compare_compression, compress, demo,
                               dpo, grpo, guide, ppo, rag, reward, sft)

    return {"sft": sft.run, "demo": demo.run, "chat_task": chat_task.run, "compress": compress.run,
            "compare_compression": compare_compression.run,
            "compare_alignment": compare_alignment.run, "reward": reward.run,
            "ppo": ppo.run, "dpo": dpo.run, "grpo": grpo.run, "rag": rag.run,
            "guide": guide.run}


def parse_flags(argv):
    """absl flag parsing that turns a bad `--config.*` override into one clear line."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
        detail = str(e)
        key = re.search(r"([A-Za-z_][A-Za-z0-9_]*)", detail).group(1)
        hint = re.search(r'Did you mean "([^"]+)"', detail)
        culprit = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                   and key in a.split("=", 1)[0].split(".")]
        sys.exit(f"launch.py: unknown config key {key!r} in {culprit[0] if culprit else '--config'}"
                 + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ptjax import sharding

    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    available = trainers()
    if config.trainer not in available:
        raise app.UsageError(f"config.trainer: unknown trainer {config.trainer!r}; "
                             f"choose one of {sorted(available)}")
    from ptjax.train import failures

    try:
        available[config.trainer](config, _WORKDIR.value)
    except failures.Preempted as e:  # saved: exit 0 so that the scheduler's restart resumes
        print(f"launch.py: {e}", file=sys.stderr, flush=True)
    except failures.RunFailed as e:  # the message says what happened and what survives
        sys.exit(f"launch.py: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
