"""The files of a Hugging Face tokenizer folder beside `tokenizer.json`: `tokenizer_config.json`
(special tokens, chat template, the class `AutoTokenizer` builds), `special_tokens_map.json` and
`chat_template.jinja`, read into a `data.Tokenizer` and written back from one.

    config = read_config(folder)                  # {} for a folder without one
    template = read_chat_template(folder, config)  # None without one
    write_files(folder, tokenizer)                 # tokenizer.json + the two JSON files

Special tokens may be written as strings or as `AddedToken` dicts (`{"content": "<s>", ...}`);
a chat template as a string, as a list of named templates (the one named "default" is read), or
in its own `chat_template.jinja` (transformers >= 4.43). What is written loads in `transformers`
with the same special tokens and template (tests/test_data_tokenizer_files.py).
"""

from __future__ import annotations

import json
import os
from typing import Any

from rlhf_jax import paths

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Every file of a tokenizer folder that `load_tokenizer` reads (tokenizer.json's BPE pairs aside).
FILES = ("tokenizer.json", CONFIG_FILE, SPECIAL_TOKENS_FILE, CHAT_TEMPLATE_FILE)
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token")


def token_string(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json (a string or an `AddedToken` dict)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Any) -> dict:
    if not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return out


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """`tokenizer_config.json` of `folder` ({} when absent), its special tokens completed from
    `special_tokens_map.json` where the config leaves them out."""
    folder = paths.as_path(folder)
    config = _read_json(folder / CONFIG_FILE)
    special = _read_json(folder / SPECIAL_TOKENS_FILE)
    for name in SPECIAL_TOKENS:
        if token_string(config.get(name)) is None and token_string(special.get(name)):
            config[name] = special[name]
    return config


def read_chat_template(folder: str | os.PathLike, config: dict[str, Any]) -> str | None:
    """The folder's chat template: `config["chat_template"]` (a string, or the template named
    "default" of a list), else `chat_template.jinja`, else None."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    file = paths.as_path(folder) / CHAT_TEMPLATE_FILE
    return file.read_text() if file.is_file() else None


def config_of(tokenizer: Any) -> dict[str, Any]:
    """The `tokenizer_config.json` written for `tokenizer` (a `data.Tokenizer`): the fields it was
    read with, its special tokens and chat template, and the class `AutoTokenizer` builds
    (`PreTrainedTokenizerFast` unless the folder it came from named one)."""
    config = {k: v for k, v in tokenizer.config.items() if k not in ("chat_template",)}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("clean_up_tokenization_spaces", False)
    for name, value in (
        ("bos_token", tokenizer.bos_token),
        ("eos_token", tokenizer.eos_token),
        ("pad_token", tokenizer.pad_token),
    ):
        if value is None:
            config.pop(name, None)
        else:
            config[name] = value
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    return config


def write_files(folder: str | os.PathLike, tokenizer: Any) -> None:
    """Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` of
    `tokenizer` into `folder` (local or cloud, each file atomically)."""
    folder = paths.as_path(folder)
    paths.write_text_atomic(folder / "tokenizer.json", tokenizer.backend.to_str(pretty=True))
    config = config_of(tokenizer)
    paths.write_text_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    special = {n: config[n] for n in SPECIAL_TOKENS if n in config}
    paths.write_text_atomic(folder / SPECIAL_TOKENS_FILE, json.dumps(special, indent=2) + "\n")
