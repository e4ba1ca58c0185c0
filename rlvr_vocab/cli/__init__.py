"""Command-line tools, each a Hydra app over the same conf/ as grpo_train.py (so every config group works).

rlvr-eval           rlvr_vocab/cli/evaluate.py      accuracy of a model, checkpoint, adapter or whole run
rlvr-infer          rlvr_vocab/cli/infer.py         answer one question, a jsonl file, or interactively
rlvr-prepare-data   rlvr_vocab/cli/prepare_data.py  cache model + dataset, export parquet for offline nodes
rlvr-check-rewards  rlvr_vocab/cli/check_rewards.py score gold and wrong answers through the rewards
rlvr-viz            rlvr_vocab/cli/viz.py           PNGs of a reasoning-vocabulary run (argparse, no config groups)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
# A tool writes no Hydra run folder and leaves logging alone (loguru does it); a command line may still set these.
QUIET_HYDRA = ("hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none", "hydra/hydra_logging=none")


def run_tool(task: Callable[[DictConfig], object]) -> None:
    """Run ``task(cfg)`` as a Hydra app over conf/ (``RLVR_CONFIG_DIR`` overrides the folder); exit 2 on ConfigError."""
    import hydra
    from loguru import logger

    import rlvr_vocab.config  # noqa: F401  (registers the schema)
    from rlvr_vocab.config import ConfigError

    args = sys.argv[1:]
    given = {a.lstrip("+~").split("=", 1)[0] for a in args}
    quiet = [q for q in QUIET_HYDRA if q.split("=", 1)[0] not in given]
    sys.argv = [sys.argv[0], *quiet, *args]
    config_dir = os.environ.get("RLVR_CONFIG_DIR", str(CONFIG_DIR))

    def app(cfg: DictConfig) -> None:
        try:
            task(cfg)
        except ConfigError as err:
            logger.error(str(err))
            sys.exit(2)

    hydra.main(config_path=config_dir, config_name="config", version_base="1.3")(app)()
