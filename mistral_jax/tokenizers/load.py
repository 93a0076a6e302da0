"""`load_tokenizer`: find and load the tokenizer of a file or checkpoint directory, with its chat format."""

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import tokenizers

from mistral_jax import families
from mistral_jax.errors import UserError
from mistral_jax.paths import as_path, is_url, require_local
from mistral_jax.tokenizers.base import Tokenizer
from mistral_jax.tokenizers.chat_templates import ChatFormat, JinjaTemplate, default_chat_format
from mistral_jax.tokenizers.hf import HFVocab
from mistral_jax.tokenizers.spm import SentencePieceVocab
from mistral_jax.tokenizers.tekken import TekkenVocab, is_tekken_file
from mistral_jax.tokenizers.vocab import Vocab

# mistral-common names its sentencepiece files tokenizer.model.v1, mistral_instruct_tokenizer_240323.model.v3, ...,
# with an m1 suffix for the multimodal ones (tokenizer.model.v7m1)
_MISTRAL_COMMON_NAME = re.compile(r"\.model\.v(\d+)(?:m\d+)?$")
# What a tokenizer is loaded from, besides the model file itself: these are copied from a URL.
SIDE_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
MODEL_FILES = ("tekken.json", "tokenizer.json", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike[str], family: str | None = None) -> Tokenizer:
    """Load a sentencepiece `tokenizer.model`, an HF `tokenizer.json`, Mistral's `tekken.json`, a GGUF file or a
    checkpoint directory.

    A directory is searched for tekken.json, tokenizer.json, then tokenizer.model, then mistral-common's
    tokenizer.model.vN (highest N). A tokenizer_config.json (or chat_template.jinja) beside the tokenizer file
    supplies the chat template, BOS/EOS tokens and `add_bos_token` (a tekken.json's chat format is Mistral's).
    `family` (a name in families.py) picks the chat format used when the checkpoint carries no template; when
    None it is read from config.json's `model_type`, or taken as "mistral" for a mistral-common or tekken file.
    A URL (an orbax checkpoint on gs://) has its few tokenizer files copied to a temporary directory; a GGUF
    file must be local.
    """
    if family is not None:
        families.get(family)  # a UserError naming the known families
    if is_url(path):  # e.g. an orbax checkpoint on gs:// with its tokenizer files: those few files, copied
        with tempfile.TemporaryDirectory(prefix="mistral-jax-tokenizer-") as scratch:
            tokenizer = load_tokenizer(fetch_tokenizer_files(path, Path(scratch)), family)
        tokenizer.source = os.fspath(path)
        return tokenizer
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    file = _find_tokenizer_file(path) if path.is_dir() else path
    if family is None and path.is_dir():
        family = _family_from_config(path / "config.json")
    if family is None and (_MISTRAL_COMMON_NAME.search(file.name) or is_tekken_file(file)):
        family = "mistral"
    vocab, template = _load_vocab(file)
    chat_format: ChatFormat | None = JinjaTemplate(template) if template else default_chat_format(family)
    return Tokenizer(vocab, chat_format, source=str(file))


def fetch_tokenizer_files(url, directory: Path, required: bool = True) -> Path:
    """Copy the tokenizer files of a URL (a checkpoint directory, or one tokenizer file) into the local
    `directory`; returns what to load locally: `directory`, or the copied file. A GGUF file is not copied.
    A directory without a tokenizer is a ValueError if `required`, else leaves `directory` empty."""
    source = as_path(url)
    if source.suffix == ".gguf":  # its tokenizer is inside the model file
        require_local(url, "a GGUF file")
    if source.is_dir():
        folder, file = source, None
        names = [*MODEL_FILES, *sorted(p.name for p in source.glob("tokenizer.model.v*")), *SIDE_FILES, "config.json"]
    elif source.is_file():
        folder, file = source.parent, source.name
        names = [file, *SIDE_FILES]
    else:
        raise FileNotFoundError(f"tokenizer path does not exist: {url}")
    directory.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        if (folder / name).is_file():
            (directory / name).write_bytes((folder / name).read_bytes())
            copied.append(name)
    if required and file is None and not set(copied) - {*SIDE_FILES, "config.json"}:
        raise UserError(f"no tokenizer in {url}: expected {', '.join(MODEL_FILES)} or tokenizer.model.vN")
    return directory if file is None else directory / file


def _find_tokenizer_file(directory: Path) -> Path:
    for name in MODEL_FILES:  # tekken.json first: Mistral's own file, where a converted tokenizer.json sits beside it
        if (directory / name).is_file():
            return directory / name
    versioned = [
        (int(match.group(1)), file)
        for file in directory.glob("tokenizer.model.v*")
        if (match := _MISTRAL_COMMON_NAME.search(file.name)) and file.is_file()
    ]
    if versioned:
        return max(versioned)[1]
    raise UserError(f"no tokenizer in {directory}: expected {', '.join(MODEL_FILES)} or tokenizer.model.vN")


def _family_from_config(config_file: Path) -> str | None:
    if not config_file.is_file():
        return None
    family = families.from_hf(json.loads(config_file.read_text()))
    return None if family is None else family.name


def _load_vocab(file: Path) -> tuple[Vocab, str | None]:
    """The vocabulary of one tokenizer file and the chat template that goes with it."""
    with file.open("rb") as handle:
        magic = handle.read(4)
    if magic == b"GGUF":
        from mistral_jax.tokenizers.gguf_vocab import load_gguf_vocab  # the gguf package, for GGUF files only

        return load_gguf_vocab(file)
    if is_tekken_file(file):  # Mistral's chat format (the family's), never a jinja template beside it
        return TekkenVocab(file.read_bytes(), source=str(file)), None
    config = _read_tokenizer_config(file.parent)
    if file.suffix == ".json":
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # the library raises a bare Exception for malformed files
            raise UserError(f"{file}: not a valid tokenizer.json ({error})") from error
        bos_id, eos_id = (_token_id(tokenizer, config.get(key)) for key in ("bos_token", "eos_token"))
        vocab: Vocab = HFVocab(tokenizer, bos_id=bos_id, eos_id=eos_id, add_bos=config.get("add_bos_token"))
    else:
        try:
            vocab = SentencePieceVocab(file.read_bytes(), add_bos=config.get("add_bos_token", True))
        except RuntimeError as error:
            raise UserError(f"{file}: not a sentencepiece model, tokenizer.json or GGUF file ({error})") from error
    return vocab, _chat_template(config, file.parent)


def _read_tokenizer_config(directory: Path) -> dict[str, Any]:
    config_file = directory / "tokenizer_config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def _token_id(tokenizer: tokenizers.Tokenizer, token: str | dict[str, Any] | None) -> int | None:
    """The id of a tokenizer_config token entry (a string or an AddedToken dict)."""
    if isinstance(token, dict):
        token = token.get("content")
    return None if token is None else tokenizer.token_to_id(token)


def _chat_template(config: dict[str, Any], directory: Path) -> str | None:
    """tokenizer_config.json's `chat_template` (the "default" one of a named list), else chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    return template
