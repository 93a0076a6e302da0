"""Helpers for the SFT tests: made-up chats, a tiny ChatML tokenizer trained here, a tiny model saved with it."""

import json
import struct
from pathlib import Path

import jax
import tokenizers
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c
from tokenizers import decoders, models, pre_tokenizers, trainers

import mistral_jax as mj
from mistral_jax.checkpoints import orbax

SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FACTS = [
    ("What colour is the sky on Vela?", "The sky on Vela is green."),
    ("Who runs the Orbit Cafe?", "Mira runs the Orbit Cafe."),
    ("When does the ferry leave?", "The ferry leaves at nine."),
    ("How many moons does Vela have?", "Vela has three moons."),
    ("What do the robots eat?", "The robots eat copper soup."),
    ("Where is the old lighthouse?", "The old lighthouse is on the north cliff."),
]


def chats(n: int | None = None) -> list[dict]:
    """Conversations (single and multi-turn, some with a system prompt) over FACTS, n of them (default all)."""
    out = []
    for i, (question, answer) in enumerate(FACTS):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 3 == 1:
            messages.insert(0, {"role": "system", "content": "Answer in one sentence."})
        if i % 3 == 2:
            q2, a2 = FACTS[(i + 1) % len(FACTS)]
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        out.append({"messages": messages})
    return out[:n]


def write_jsonl(path: Path, records) -> Path:
    """One line per record: a dict as JSON, a str as it is (for bad lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def train_tokenizer() -> tokenizers.Tokenizer:
    """A ~200-token BPE over the chats' text (fits the tiny presets' 256-token vocabulary), in a second."""
    corpus = [text for q, a in FACTS for text in (q, a)] + ["system user assistant", "Answer in one sentence."]
    alphabet = sorted(set("".join(corpus) + "\n"))
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS, initial_alphabet=alphabet)
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def save_model(path: Path, preset: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random `preset` model as an orbax checkpoint with the tokenizer files beside it."""
    config = mj.ModelConfig.from_preset(preset)
    params = mj.init_params(config, jax.random.key(seed))
    return orbax.write(config, params, path, extra_files=sorted(tokenizer_dir.iterdir()))


def preference_pairs(conversational: bool = False) -> list[dict]:
    """A synthetic preference task over FACTS: the chosen answer is the sentence, the rejected one the same words
    in reverse order (one style preferred); every question against each answer style, text or message lists."""
    out = []
    for i, (question, answer) in enumerate(FACTS):
        for prefix in ("", "Answer in one sentence. "):
            words = answer.rstrip(".").split()
            chosen, rejected = answer, " ".join(reversed(words)) + "."
            if conversational:
                prompt = [{"role": "user", "content": prefix + question}]
                if i % 2:
                    prompt.insert(0, {"role": "system", "content": "Answer in one sentence."})
                out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                            "rejected": [{"role": "assistant", "content": rejected}]})
            else:
                out.append({"prompt": f"{prefix}{question}", "chosen": f" {chosen}", "rejected": f" {rejected}"})
    return out


def read_events(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under `directory` by tag: [(step, value)], records' CRCs checked (the
    TFRecord framing tensorboardX writes, parsed with its Event proto)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = file.read_bytes(), 0
        while offset < len(data):
            header = data[offset: offset + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[offset + 8: offset + 12])[0] == masked_crc32c(header)
            body = data[offset + 12: offset + 12 + length]
            assert struct.unpack("<I", data[offset + 12 + length: offset + 16 + length])[0] == masked_crc32c(body)
            offset += 16 + length
            event = event_pb2.Event.FromString(body)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
