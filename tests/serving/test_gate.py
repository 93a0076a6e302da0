"""The serving gate: verify drafts only where the expected tokens per second beat a plain step's."""

import pytest

from mistral_jax.serving.gate import EXPLORE_EVERY, WidthGate

CPU_BATCH_8 = {0: 1.0, 2: 3.6, 4: 4.0}  # a batch-8 verify against a decode step on our CPU (RESULTS.md, Serving)


def test_a_full_batch_verifies_only_when_most_drafts_are_kept():
    gate = WidthGate(dict(CPU_BATCH_8), gains={2: 0.5, 4: 1.0}, drafting=8)
    assert gate.max_width(active=8) == 0  # (8 + 8 * 1.0) / 4.0 < 8 / 1.0
    gate.gains[4] = 3.5
    assert gate.max_width(active=8) == 4  # (8 + 8 * 3.5) / 4.0 = 9 > 8
    gate.drafting = 2
    assert gate.max_width(active=8) == 0  # two drafting slots cannot pay for six idle ones


def test_one_slot_verifies_where_a_draft_keeps_more_than_the_verify_costs():
    gate = WidthGate({0: 1.0, 2: 1.9, 4: 2.1}, gains={2: 1.0, 4: 1.5}, drafting=1)
    assert gate.max_width(active=1) == 4  # (1 + 1.5) / 2.1 = 1.19 beats 2 / 1.9 = 1.05 and 1 / 1
    gate.gains[4] = 0.9
    assert gate.max_width(active=1) == 2  # 1.9 / 2.1 = 0.90 < 1.05
    gate.gains[2] = 0.5
    assert gate.max_width(active=1) == 0  # 1.5 / 1.9 = 0.79 < 1


def test_gains_start_optimistic_follow_what_is_kept_and_are_explored_while_held_back():
    gate = WidthGate(dict(CPU_BATCH_8))
    assert gate.gains == {2: 2.0, 4: 4.0}  # every width is tried first
    gate.observe(width=4, drafting=8, kept=0)
    assert gate.drafting == 8 and gate.gains[4] == pytest.approx(3.0)  # 4 + 0.25 * (0 - 4)
    gate.observe(width=0, drafting=8, kept=0)
    assert gate.gains[4] == pytest.approx(3.0)  # a plain step says nothing of the gains
    gate.gains = {2: 0.0, 4: 0.0}
    widths = [gate.max_width(active=8) for _ in range(2 * EXPLORE_EVERY)]
    assert widths.count(4) == 2 and widths.count(0) == 2 * EXPLORE_EVERY - 2  # one verify every EXPLORE_EVERY
    assert widths[EXPLORE_EVERY - 1] == 4
    gate.drafting = 0
    assert [gate.max_width(active=8) for _ in range(2 * EXPLORE_EVERY)] == [0] * 2 * EXPLORE_EVERY  # no drafts
