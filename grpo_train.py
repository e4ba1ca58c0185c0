"""Train a policy with GRPO: `python grpo_train.py [hydra overrides]` (see README.md and TRAINING_SETUP.md)."""

import warnings

import hydra
from omegaconf import DictConfig

import rlvr_vocab.config  # noqa: F401  (registers the structured-config schema with Hydra)

# conf/hydra/launcher/submitit_*.yaml share the plugin's schema names on purpose (so `hydra/launcher=submitit_slurm`
# works as documented); Hydra 1.3 still validates them against that schema but warns about the shared name.
warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema with the same name")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlvr_vocab.train import hydra_entry

    hydra_entry(cfg)


if __name__ == "__main__":
    main()
