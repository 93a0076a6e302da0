"""Tokenizers rebuilt from GGUF metadata, so a single GGUF file is a complete checkpoint."""

import os
from typing import Any

import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, models, pre_tokenizers

from mistral_jax import gguf_file
from mistral_jax.errors import UserError
from mistral_jax.tokenizers.errors import UnsupportedTokenizer
from mistral_jax.tokenizers.hf import HFVocab
from mistral_jax.tokenizers.spm import SentencePieceVocab
from mistral_jax.tokenizers.vocab import Vocab

# GGUF token types; they share sentencepiece's numbering.
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> (the HF pre-tokenizer of the same model, whether its BPE
# takes a whole pre-token that is in the vocabulary as it is: tokenizer.json's ignore_merges).
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
# The split patterns of Llama 3's tokenizer.json and of Mistral's tekken files (Nemo, Ministral).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {
    "gpt-2": (_BYTE_LEVEL, False),
    "smollm": (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL]), False),
    "llama-bpe": (_split_then_bytes(LLAMA3_SPLIT), True),  # Llama 3.x
    "tekken": (_split_then_bytes(TEKKEN_SPLIT), False),  # Mistral Nemo, Ministral
}


def load_gguf_vocab(path: str | os.PathLike[str]) -> tuple[Vocab, str | None]:
    """The vocabulary and chat template (`tokenizer.chat_template`, if any) of a GGUF file."""
    fields = gguf_file.reader(path).fields

    def get(key: str, default: Any = None) -> Any:
        return fields[key].contents() if key in fields else default

    model = get("tokenizer.ggml.model")
    if model is None:
        raise UserError(f"{path}: the GGUF file carries no tokenizer (no tokenizer.ggml.model)")
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    bos_id, eos_id = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
    add_bos = bool(get("tokenizer.ggml.add_bos_token", model == "llama"))
    if model == "gpt2":
        pre = get("tokenizer.ggml.pre", "gpt-2")
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedTokenizer(
                f"{path}: GGUF pre-tokenizer {pre!r} is not supported (supported: {sorted(PRE_TOKENIZERS)})"
            )
        tokenizer = _byte_level_bpe(tokens, types, get("tokenizer.ggml.merges"), *PRE_TOKENIZERS[pre])
        vocab: Vocab = HFVocab(tokenizer, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos)
    elif model == "llama":
        proto = _sentencepiece_proto(
            tokens,
            types,
            get("tokenizer.ggml.scores", [0.0] * len(tokens)),
            ids={
                "unk": get("tokenizer.ggml.unknown_token_id"),
                "bos": bos_id,
                "eos": eos_id,
                "pad": get("tokenizer.ggml.padding_token_id"),
            },
            add_dummy_prefix=bool(get("tokenizer.ggml.add_space_prefix", True)),
        )
        vocab = SentencePieceVocab(proto, add_bos=add_bos)
    else:
        raise UnsupportedTokenizer(
            f"{path}: GGUF tokenizer model {model!r} is not supported (supported: 'gpt2', 'llama')"
        )
    return vocab, get("tokenizer.chat_template")


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str], pre_tokenizer: pre_tokenizers.PreTokenizer,
                    ignore_merges: bool = False) -> tokenizers.Tokenizer:
    """A GPT-2 style byte-level BPE; control tokens become special added tokens, user-defined ones plain ones."""
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    )
    tokenizer.add_tokens(
        [tokenizers.AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    )
    return tokenizer


def _sentencepiece_proto(
    tokens: list[str], types: list[int], scores: list[float], ids: dict[str, int | None], add_dummy_prefix: bool
) -> bytes:
    """A sentencepiece BPE model with the GGUF pieces, so llama.cpp's "llama" vocab is encoded by sentencepiece."""
    proto = sentencepiece_model_pb2.ModelProto()
    for token, kind, score in zip(tokens, types, scores):
        proto.pieces.add(piece=token, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    for name, token_id in ids.items():
        # sentencepiece finds bos/eos/pad/unk by piece string; -1 marks an absent one.
        setattr(spec, f"{name}_id", -1 if token_id is None else token_id)
        if token_id is not None:
            setattr(spec, f"{name}_piece", tokens[token_id])
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    return proto.SerializePartialToString()
