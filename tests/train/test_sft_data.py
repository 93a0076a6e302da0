"""train.data: JSONL validation, assistant-only loss masks, packing, deterministic resumable batches, host shares."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from sft_helpers import chats, write_jsonl

from mistral_jax.tokenizers import load_tokenizer
from train.data import Batches, DataError, load_data, make_rows, read_conversations, split_indices, to_example, tokenize

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
        read_conversations(path)


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
    lengths = [len(tokenize(tokenizer, c)[0]) - 1 for _, c in read_conversations(path)]
    assert data.stats["truncated"] == sum(n > 30 for n in lengths) > 0
    assert data.train.epoch_rows(0)["inputs"].shape[1] == 30


def test_batches_are_seeded_and_resume_exactly(tokenizer, data_file: Path) -> None:
    def stream(seed: int, state=None, n: int = 7):
        data = load_data(data_file, tokenizer, seq_len=48, rows=3, packing=True, seed=seed, eval_fraction=0,
                         vocab_size=256)
        if state:
            data.train.restore(state)
        return data.train, [next(data.train)["inputs"] for _ in range(n)]

    batches, first = stream(0)
    assert batches.state()["epoch"] >= 2  # several epochs, reshuffled each time
    _, again = stream(0)
    assert all((a == b).all() for a, b in zip(first, again))
    assert any((a != b).any() for a, b in zip(first, stream(1)[1]))
    partial, _ = stream(0, n=3)
    _, rest = stream(0, state=json.loads(json.dumps(partial.state())), n=4)  # the state survives JSON
    assert all((a == b).all() for a, b in zip(first[3:], rest))


def test_eval_split_and_host_shares(tokenizer, data_file: Path) -> None:
    assert [len(part) for part in split_indices(1, 0.05, 0)] == [1, 0]
    assert [len(part) for part in split_indices(6, 0.05, 0)] == [5, 1]
    assert [len(part) for part in split_indices(100, 0.05, 0)] == [95, 5]
    kwargs = dict(seq_len=64, rows=1, packing=False, seed=0, eval_fraction=0.2, vocab_size=256)
    hosts = [load_data(data_file, tokenizer, process_index=i, process_count=2, **kwargs) for i in range(2)]
    inputs = [sorted(tuple(e.inputs) for e in h.train.examples) for h in hosts]
    everything = sorted(tuple(e.inputs) for e in load_data(data_file, tokenizer, **kwargs).train.examples)
    assert sorted(inputs[0] + inputs[1]) == everything and min(map(len, inputs)) >= len(everything) // 2
    assert (hosts[0].eval_rows["inputs"] == hosts[1].eval_rows["inputs"]).all()  # every host evaluates all


def test_token_ids_beyond_the_model_vocabulary(tokenizer, data_file: Path) -> None:
    with pytest.raises(DataError, match=r"chats.jsonl:\d+: token id \d+ is not below the model's vocab_size 50"):
        load_data(data_file, tokenizer, seq_len=64, rows=1, packing=True, seed=0, eval_fraction=0, vocab_size=50)


def test_batches_need_examples() -> None:
    with pytest.raises(DataError, match="no training examples"):
        Batches([], 8, 1, True, 0)
