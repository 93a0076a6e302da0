"""train.pairs: TRL's preference formats, response-only loss masks, TRL's keep_end truncation, bad lines, per-process
shards and resume."""

import json
from pathlib import Path

import numpy as np
import pytest
from sft_helpers import preference_pairs, write_jsonl

from train.data import DataError
from train.pairs import load_pairs, pair_rows, parse_pair, tokenize_pair

GOOD = json.dumps(preference_pairs()[0])


@pytest.mark.parametrize("bad, message", [
    ("{not json", "invalid JSON"),
    ('{"prompt": "hi", "chosen": "a"}', '"prompt", "chosen" and "rejected"'),
    ('{"prompt": "hi", "chosen": "a", "rejected": ""}', '"rejected" is empty'),
    ('{"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}', "all strings or all"),
    ('{"prompt": [], "chosen": [{"role": "assistant", "content": "a"}], "rejected": []}',
     '"prompt" must be a non-empty'),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}', '"chosen" must hold assistant messages only'),
    ('{"prompt": [{"role": "robot", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}', "role 'robot'"),
])
def test_bad_lines_name_their_file_and_line(tmp_path: Path, tokenizer, bad: str, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{message}"):
        load_pairs(path, tokenizer, seq_len=32, pairs=1, seed=0, eval_fraction=0, vocab_size=256)


def test_text_pairs_tokenize_as_trl_with_eos_and_a_response_only_mask(tokenizer) -> None:
    pair = parse_pair(GOOD, "x")
    prompt, chosen, rejected = tokenize_pair(tokenizer, pair)
    assert prompt == tokenizer.encode(pair["prompt"])
    assert prompt + chosen == tokenizer.encode(pair["prompt"] + pair["chosen"], eos=True)
    assert chosen[-1] == rejected[-1] == tokenizer.eos_id
    assert tokenizer.decode(chosen[:-1]).strip() == pair["chosen"].strip()
    rows, cut = pair_rows(prompt, chosen, rejected, 64)
    assert not cut and rows["inputs"].shape == (2, 64)
    for row, response in enumerate((chosen, rejected)):
        weighted = rows["targets"][row][rows["weights"][row] > 0]
        assert weighted.tolist() == response  # every response token (EOS too) is a target, no prompt token is
        n = len(prompt) + len(response) - 1
        assert (rows["positions"][row, :n] == np.arange(n)).all() and (rows["positions"][row, n:] == -1).all()


def test_conversational_pairs_use_the_chat_template(tokenizer) -> None:
    pair = parse_pair(json.dumps(preference_pairs(conversational=True)[1]), "x")
    prompt, chosen, rejected = tokenize_pair(tokenizer, pair)
    assert prompt == tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True)
    assert prompt + chosen == tokenizer.apply_chat_template(pair["prompt"] + pair["chosen"],
                                                            add_generation_prompt=False)
    assert tokenizer.decode(chosen) == pair["chosen"][0]["content"] + "\n"  # ChatML's "<|im_end|>\n" ends the turn
    assert tokenizer.eos_id in chosen and tokenizer.eos_id in rejected


def test_long_pairs_keep_their_end_as_trl_and_are_counted(tmp_path: Path, tokenizer) -> None:
    prompt, chosen, rejected = list(range(10, 30)), [40, 41, 42], [50, 51]
    rows, cut = pair_rows(prompt, chosen, rejected, 8)  # 9 tokens kept of 23 and 22: the prompt cut from the left
    assert cut
    assert rows["inputs"][0].tolist() + [rows["targets"][0, -1]] == (prompt + chosen)[-9:]
    assert rows["inputs"][1].tolist() + [rows["targets"][1, -1]] == (prompt + rejected)[-9:]
    assert rows["targets"][0][rows["weights"][0] > 0].tolist() == chosen
    long = {"prompt": "Answer in one sentence. " * 6 + "Who runs the Orbit Cafe? ",
            "chosen": "Mira runs the Orbit Cafe.", "rejected": "Cafe Orbit the runs Mira."}
    path = write_jsonl(tmp_path / "long.jsonl", [long, *preference_pairs()[:3]])
    data = load_pairs(path, tokenizer, seq_len=24, pairs=1, seed=0, eval_fraction=0, vocab_size=256)
    assert data.stats["truncated"] == 1 and data.stats["dropped"] == 0 and data.stats["pairs"] == 4


def test_process_shards_make_the_global_batch_and_resume_across_counts(prefs_file: Path, tokenizer) -> None:
    kwargs = dict(seq_len=40, pairs=4, micro_batches=2, seed=3, eval_fraction=0.2, vocab_size=256)
    one = load_pairs(prefs_file, tokenizer, **kwargs)
    hosts = [load_pairs(prefs_file, tokenizer, process_index=i, process_count=2, **kwargs) for i in range(2)]
    assert one.stats["train"] == 19 and one.stats["eval"] == 5 and len(one.eval_rows["inputs"]) == 10
    for host in hosts:
        np.testing.assert_array_equal(host.eval_rows["inputs"], one.eval_rows["inputs"])  # every host's copy
    for _ in range(3):  # [micro-batch 0: 4 pairs = 8 rows, micro-batch 1: 8 rows]; each host 2 pairs of each
        whole, parts = next(one.train), [next(h.train) for h in hosts]
        assert whole["inputs"].shape == (16, 40)
        for k in range(2):
            joined = np.concatenate([p["inputs"][4 * k: 4 * k + 4] for p in parts])
            np.testing.assert_array_equal(joined, whole["inputs"][8 * k: 8 * k + 8])
        chosen, rejected = whole["weights"][0::2].sum(-1), whole["weights"][1::2].sum(-1)
        assert (chosen > 0).all() and (rejected > 0).all()
    table = {"streams": hosts[0].train.state()["streams"] + hosts[1].train.state()["streams"]}
    assert table == one.train.state()
    resumed = load_pairs(prefs_file, tokenizer, **kwargs)
    resumed.train.restore(json.loads(json.dumps(table)))
    np.testing.assert_array_equal(next(resumed.train)["inputs"], next(one.train)["inputs"])
