"""Checks that read the file system or the Hugging Face cache, run before any model or dataset is loaded.

``validate()`` (config.py) checks the config by itself; these look at what it points to, so that a bad
file or a model that cannot be fetched is a ConfigError naming the key, not a library traceback after
minutes of loading:

* ``check_data_file``: a local data file that is empty, or a ``.jsonl`` line that is not a JSON object
  (the error names the file and the line number);
* ``check_model_available``: a hub model that is not cached while ``HF_HUB_OFFLINE=1``, or a local
  model path that does not exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig

from rlvr_vocab.config import ConfigError


def _check_json_lines(path: Path, key: str) -> int:
    """Number of rows in a JSON-lines file; ConfigError naming the first line that is not a JSON object."""
    rows = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                msg = getattr(err, "msg", str(err))
                raise ConfigError(
                    f"{key}={str(path)!r}: line {number} is not valid JSON ({msg}): {line[:80].decode(errors='replace')!r}"
                    " (a line cut short by an interrupted write looks like this). Fix or remove that line."
                ) from None
            if not isinstance(row, dict):
                raise ConfigError(
                    f"{key}={str(path)!r}: line {number} is a JSON {type(row).__name__}, not an object with one "
                    "field per column."
                )
            rows += 1
    return rows


def check_data_file(path: str | os.PathLike, key: str) -> None:
    """Refuse an empty data file, or a JSON-lines file with a malformed line, naming ``key``, the file and the line.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (Path(d) / "t.jsonl").write_text('{"question": "1+1", "answer": "2"}\\n{"question": "2+2", "an\\n')
        ...     try:
        ...         check_data_file(Path(d) / "t.jsonl", "dataset.path")
        ...     except ConfigError as err:
        ...         print(str(err).split(": ", 1)[1].split(" (")[0])
        line 2 is not valid JSON
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ConfigError(f"{key}={str(path)!r} is empty (0 bytes): there are no rows to load.")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        return  # parquet / csv: their readers name the problem well enough
    if suffix == ".json":
        try:
            whole = json.loads(path.read_bytes())
        except ValueError:
            whole = None  # not one JSON document: JSON lines under a .json name (the loader accepts both)
        if whole is not None:
            if isinstance(whole, list) and not whole:
                raise ConfigError(f"{key}={str(path)!r} holds an empty JSON list: there are no rows to load.")
            return
    if _check_json_lines(path, key) == 0:
        raise ConfigError(f"{key}={str(path)!r} has only blank lines: there are no rows to load.")


def check_model_available(model_cfg: DictConfig) -> None:
    """Refuse a ``model.name_or_path`` that cannot be loaded: a missing local folder, or an uncached hub id offline."""
    if model_cfg.source != "hub":
        return
    name = str(model_cfg.name_or_path)
    if Path(name).expanduser().is_dir():
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ConfigError(f"model.name_or_path={name!r} is not a directory (a hub model id looks like owner/name).")
    import huggingface_hub

    if not huggingface_hub.is_offline_mode():
        return  # from_pretrained downloads it, or says that the id does not exist
    cached = huggingface_hub.try_to_load_from_cache(name, "config.json", revision=model_cfg.revision)
    if not isinstance(cached, str):
        from huggingface_hub import constants

        revision = f" at revision {model_cfg.revision!r}" if model_cfg.revision else ""
        raise ConfigError(
            f"model.name_or_path={name!r}{revision} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and "
            "offline mode is on (HF_HUB_OFFLINE=1), so it cannot be downloaded. Download it on a machine with "
            f"internet (`hf download {name}`, or rlvr-prepare-data) into the cache that HF_HOME points at, or set "
            "model.name_or_path to a local model folder."
        )
