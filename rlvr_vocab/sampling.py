"""Fast rollouts without vLLM (placeholder: TRL's generate path until the static-cache sampler lands)."""

from __future__ import annotations


def generate_completions(trainer, prompt_ids: list[list[int]]):
    """(completion_ids, logprobs) for each prompt, as GRPOTrainer._generate_single_turn returns them."""
    from trl import GRPOTrainer

    return GRPOTrainer._generate_single_turn(trainer, prompt_ids, None, {}, trainer.num_generations)
