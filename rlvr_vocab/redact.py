"""Secret-looking values (tokens, API keys, passwords), kept out of every file a run writes.

Two signs of a secret: its key (``hub_token``, ``wandb_api_key``, ``password``, ...) and its value
(``hf_...``, ``sk-...``, ``ghp_...``: the formats of well-known token issuers). Every writer of the run
dir goes through here: ``config.yaml`` and ``.hydra/`` (``scrub_secrets``), the command line that
trackers record (``scrub_argv``), and ``training_args.bin`` (trainer.py pickles its config through
``scrub_secrets``). Secrets belong in environment variables (``HF_TOKEN``, ``WANDB_API_KEY``), which no
file records; one on the command line is still visible to ``ps`` and the shell history.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# A key whose value is a secret: *api_key / *secret* / *password* / *credential*, or one ending in token / auth.
SECRET_KEY = re.compile(
    r"(api[_-]?key|apikey|access[_-]?key|private[_-]?key|secret|password|passwd|credential|(?:^|[_.-])token$|"
    r"(?:^|[_.-])auth$)",
    re.IGNORECASE,
)
# Values in the format of well-known tokens: Hugging Face, OpenAI-style, GitHub, Slack.
SECRET_VALUE = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|"
    r"xox[abposr]-[A-Za-z0-9-]{10,})"
)
# key=value in an override or a command-line argument (optionally +, ++ or ~ in front); several of them
# joined by commas or spaces, as in Hydra's override_dirname.
_ASSIGNMENT = re.compile(r"^(?P<key>[+~]*[\w.@/-]+)=(?P<value>.*)$", re.DOTALL)
_ASSIGNMENTS = re.compile(r"(?P<sep>^|[,\s])(?P<key>[+~]*[\w.@/-]+)=(?P<value>[^,\s]*)")


def is_secret_key(key: Any) -> bool:
    """Whether a config key (or the last part of a dotted one) names a secret.

    Example:
        >>> [is_secret_key(k) for k in ["hub_token", "training.extra.hub_token", "WANDB_API_KEY", "max_new_tokens",
        ...                             "include_num_input_tokens_seen", "answer_key", "password"]]
        [True, True, True, False, False, False, True]
    """
    return bool(SECRET_KEY.search(str(key).rsplit(".", 1)[-1]))


def scrub_text(text: str) -> str:
    """``text`` with token-shaped substrings masked, and the value of a secret ``key=value`` assignment too.

    Example:
        >>> scrub_text("+training.extra.hub_token=abc"), scrub_text("lr=3 hf_abcdefghijklmnopqrstuvwx")
        ('+training.extra.hub_token=***', 'lr=3 ***')
        >>> scrub_text("seed=1,+training.extra.hub_token=abc,training.max_steps=4")
        'seed=1,+training.extra.hub_token=***,training.max_steps=4'
    """
    match = _ASSIGNMENT.match(text)
    if match and match["value"] and is_secret_key(match["key"].lstrip("+~")):
        return f"{match['key']}={MASK}"

    def mask(m: re.Match) -> str:
        secret = m["value"] and is_secret_key(m["key"].lstrip("+~"))
        return f"{m['sep']}{m['key']}={MASK}" if secret else m.group(0)

    return SECRET_VALUE.sub(MASK, _ASSIGNMENTS.sub(mask, text))


def scrub_secrets(obj: Any) -> Any:
    """Mask secret values in nested dicts and lists: string values of secret-looking keys, and token-shaped strings.

    Numbers and booleans are never secrets, whatever their key is called.

    Example:
        >>> scrub_secrets({"logging": {"wandb_api_key": "abc", "project": "p"}, "hf_token": "x", "tags": ["hf_" + "a" * 30]})
        {'logging': {'wandb_api_key': '***', 'project': 'p'}, 'hf_token': '***', 'tags': ['***']}
    """
    if isinstance(obj, dict):
        return {k: MASK if is_secret_key(k) and isinstance(v, str) and v else scrub_secrets(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_secrets(v) for v in obj)
    if isinstance(obj, str):
        return scrub_text(obj)
    return obj


def scrub_argv(argv: list[str]) -> list[str]:
    """A command line with the secret values masked (``key=value`` overrides and token-shaped arguments).

    Example:
        >>> scrub_argv(["grpo_train.py", "experiment=debug", "+training.extra.hub_token=hf_x"])
        ['grpo_train.py', 'experiment=debug', '+training.extra.hub_token=***']
    """
    return [scrub_text(arg) for arg in argv]
