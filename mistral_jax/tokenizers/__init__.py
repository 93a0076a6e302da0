"""Tokenizers for Mistral, Mixtral and Llama 2 checkpoints (sentencepiece, tokenizer.json, GGUF) with chat formats."""

from mistral_jax.families import NAMES as FAMILIES  # the family names load_tokenizer takes
from mistral_jax.tokenizers.base import DecodeStream, Tokenizer
from mistral_jax.tokenizers.chat_templates import JinjaTemplate, Llama2Chat, MistralInstruct
from mistral_jax.tokenizers.load import load_tokenizer

__all__ = ["FAMILIES", "DecodeStream", "JinjaTemplate", "Llama2Chat", "MistralInstruct", "Tokenizer", "load_tokenizer"]
