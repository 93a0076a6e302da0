"""train.data: JSONL validation, assistant-only loss masks, packing, deterministic resumable batches, host shares."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from sft_helpers import chats, write_jsonl

from mistral_jax.tokenizers import load_tokenizer
from train.data import DataError, iter_conversations, load_data, make_rows, split_indices, to_example, tokenize

GOOD = json.dumps(chats(1)[0])


@pytest.mark.parametrize("bad, message", [
    ("{not json", "invalid JSON"),
    ('{"text": "hi"}', '"messages"'),
    ('{"messages": []}', "non-empty"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "string content"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
])
def test_bad_lines_name_their_line_number(tmp_path: Path, bad: str, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{message}"):
        list(iter_conversations(path))


def test_loss_mask_covers_assistant_turns_and_their_end_token(tokenizer) -> None:
    messages = chats()[2]["messages"]  # user, assistant, user, assistant
    ids, mask, last_only = tokenize(tokenizer, messages)
    assert not last_only and ids.tolist() == tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert tokenizer.decode(ids[mask]) == "".join(f"{a}\n" for a in answers)  # ChatML's "<|im_end|>\n" ends a turn
    assert (ids[mask] == tokenizer.eos_id).sum() == 2  # each turn's end-of-turn token is a target
    assert not any(q["content"] in tokenizer.decode(ids[mask]) for q in messages if q["role"] == "user")


@pytest.fixture(scope="module")
def mistral_data() -> Path:
    return Path(importlib.util.find_spec("mistral_common").origin).parent / "data"


@pytest.mark.parametrize("version, family", [(1, "mistral"), (3, "mistral"), (1, "llama")])
def test_sentencepiece_chat_formats(mistral_data: Path, version: int, family: str) -> None:
    tok = load_tokenizer(next(mistral_data.glob(f"*.model.v{version}")), family=family)
    messages = chats()[2]["messages"]
    ids, mask, last_only = tokenize(tok, messages)
    assert not last_only and (ids[mask] == tok.eos_id).sum() == 2
    assert tok.decode(ids[mask]).split() == " ".join(m["content"] for m in messages[1::2]).split()
    # Mistral v3 moves the system prompt to the last user turn: not incremental, only the last answer is trained.
    if version == 3:
        ids, mask, last_only = tokenize(tok, [{"role": "system", "content": "Be brief."}, *messages])
        assert last_only and tok.decode(ids[mask]).strip() == messages[-1]["content"]


def test_template_that_hides_turns_is_a_clear_error(tokenizer) -> None:
    class Reversed:  # renders newest-first, so no prompt is a prefix of a longer conversation
        eos_id = tokenizer.eos_id

        def apply_chat_template(self, messages, add_generation_prompt):
            return [i for m in reversed(messages) for i in tokenizer.encode(m["content"])] + [9] * add_generation_prompt

    with pytest.raises(DataError, match="x.jsonl:3: .*cannot be found"):
        tokenize(Reversed(), chats()[2]["messages"], "x.jsonl:3")


def _example(n: int, start: int):
    ids = np.arange(start, start + n + 1, dtype=np.int32)
    return to_example(ids, np.arange(n + 1) % 2 == 0, seq_len=100)[0]


def test_packing_restarts_positions_and_numbers_segments() -> None:
    examples = [_example(3, 10), _example(4, 20), _example(5, 30)]
    rows = make_rows(examples, seq_len=8, packing=True)  # 3 + 4 fit in a row; 5 starts the next
    assert rows["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 3, -1], [0, 1, 2, 3, 4, -1, -1, -1]]
    assert rows["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert rows["inputs"][0, 3:7].tolist() == [20, 21, 22, 23] and rows["targets"][0, 3:7].tolist() == [21, 22, 23, 24]
    assert rows["weights"][0, 7] == 0 and rows["weights"][1].sum() == examples[2].weights.sum()
    padded = make_rows(examples, seq_len=8, packing=False)
    assert padded["inputs"].shape == (3, 8) and (padded["segment_ids"].max(axis=1) == 1).all()


def test_truncation_is_counted(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", chats())
    data = load_data(path, tokenizer, seq_len=30, rows=2, packing=True, seed=0, eval_fraction=0, vocab_size=256)
    lengths = [len(tokenize(tokenizer, c)[0]) - 1 for _, c in iter_conversations(path)]
    assert data.stats["truncated"] == sum(n > 30 for n in lengths) > 0
    assert next(data.train)["inputs"].shape == (2, 30)


def _global_batches(data_file, tokenizer, process_count: int, steps: int, seed: int = 0, table=None, packing=True):
    """`steps` global batches [K * R, L] assembled from every process's share (micro-batch-major), the final
    stream table, and each process's count of first-epoch conversations."""
    kwargs = dict(seq_len=48, rows=4, micro_batches=2, packing=packing, seed=seed, eval_fraction=0.2, vocab_size=256)
    hosts = [load_data(data_file, tokenizer, process_index=i, process_count=process_count, **kwargs)
             for i in range(process_count)]
    if table:
        for host in hosts:
            host.train.restore(table)
    batches = []
    for _ in range(steps):
        parts = [next(host.train)["inputs"].reshape(2, 4 // process_count, 48) for host in hosts]  # [K, local, L]
        batches.append(np.concatenate(parts, axis=1).reshape(8, 48))
    table = {"streams": [i for host in hosts for i in host.train.state()["streams"]]}
    return batches, table, hosts


def test_global_batches_and_eval_split_are_the_same_on_any_number_of_processes(tokenizer, data_file: Path) -> None:
    """Seeded, reshuffled each epoch, identical on 1 and 2 processes (each tokenizing only its streams), and a
    saved stream table resumes exactly on another number of processes."""
    one, table_one, (host,) = _global_batches(data_file, tokenizer, 1, steps=6)
    two, table_two, hosts = _global_batches(data_file, tokenizer, 2, steps=6)
    assert all((a == b).all() for a, b in zip(one, two)) and table_one == table_two
    assert [h.stats["own"] for h in hosts] == [3, 2] and host.stats["own"] == host.stats["train"] == 5
    assert all((h.eval_rows["inputs"] == host.eval_rows["inputs"]).all() for h in hosts)
    assert min(table_one["streams"]) > 4  # several epochs, each reshuffled (else steps would repeat)
    assert any((a != b).any() for a, b in zip(one, one[2:]))
    assert any((a != b).any() for a, b in zip(one, _global_batches(data_file, tokenizer, 1, steps=6, seed=1)[0]))
    _, half, _ = _global_batches(data_file, tokenizer, 2, steps=2)
    table = json.loads(json.dumps(half))  # the state survives JSON
    assert all((a == b).all() for a, b in zip(one[2:], _global_batches(data_file, tokenizer, 1, 4, table=table)[0]))
    one_half = _global_batches(data_file, tokenizer, 1, steps=2)[1]
    assert all((a == b).all() for a, b in zip(one[2:], _global_batches(data_file, tokenizer, 2, 4, table=one_half)[0]))
    with pytest.raises(DataError, match="from an older mistral-jax"):  # the state runs saved before grain streams
        host.train.restore({"index": 12, "epoch": 1})


def test_eval_split_sizes() -> None:
    assert [len(part) for part in split_indices(1, 0.05, 0)] == [1, 0]
    assert [len(part) for part in split_indices(6, 0.05, 0)] == [5, 1]
    assert [len(part) for part in split_indices(100, 0.05, 0)] == [95, 5]


def test_token_ids_beyond_the_model_vocabulary(tokenizer, data_file: Path) -> None:
    with pytest.raises(DataError, match=r"chats.jsonl:\d+: token id \d+ is not below the model's vocab_size 50"):
        load_data(data_file, tokenizer, seq_len=64, rows=1, packing=True, seed=0, eval_fraction=0, vocab_size=50)


def test_data_without_a_trainable_token_is_refused(tokenizer, data_file: Path) -> None:
    with pytest.raises(DataError, match="no training example has an assistant token within seq_len=2"):
        load_data(data_file, tokenizer, seq_len=2, rows=1, packing=True, seed=0, eval_fraction=0, vocab_size=256)
