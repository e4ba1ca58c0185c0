"""Train a policy with GRPO: `python grpo_train.py [hydra overrides]` (see README.md and TRAINING_SETUP.md)."""

import hydra
from omegaconf import DictConfig

import rlvr_vocab.config  # noqa: F401  (registers the structured-config schema with Hydra)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlvr_vocab.train import hydra_entry

    hydra_entry(cfg)


if __name__ == "__main__":
    main()
