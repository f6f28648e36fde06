"""The usage forecast made before a call: prompt tokens from a learnt characters-per-token
ratio, cached tokens from what the tier last saw for the key (all of an extended prefix, only
the header after a compaction), completion tokens from a running mean; bounded per key."""

from __future__ import annotations

from ponder.operators.forecast import Forecast
from ponder.types import Usage

HEAD = "You watch one pump. Reply with JSON.\n"  # 37 characters, the same for every key


def prefix(n: int, compacted: bool = False) -> str:
    lines = "".join(f"- e{i}\n" for i in range(n))
    return HEAD + "<data key=\"a\">\n" + ("summary\n" if compacted else "") + lines


def test_first_call_knows_nothing_then_learns_the_ratio_and_the_completion_length():
    f = Forecast()
    p1, tail = prefix(10), "stats\n"
    assert f.predict("edge", p1, tail, "a") == Usage(round(len(p1 + tail) / 4), 0, 0)
    f.observe("edge", p1, tail, Usage(len(p1 + tail) // 2, 0, 30), "a")  # 2 characters per token
    p2 = prefix(12)
    assert f.predict("edge", p2, tail, "a") == Usage(round(len(p2 + tail) / 2), round(len(p1) / 2), 30)
    # later observations move the means by a tenth
    f.observe("edge", p2, tail, Usage(len(p2 + tail) // 2, 0, 40), "a")
    assert f.predict("edge", p2, tail, "a").completion_tokens == round(0.9 * 30 + 0.1 * 40)


def test_after_a_compaction_only_the_header_is_predicted_cached():
    f = Forecast()
    tail = "stats\n"
    f.observe("edge", prefix(16), tail, Usage(100, 0, 10), "a")
    ratio = len(prefix(16) + tail) / 100
    compacted = prefix(8, compacted=True)
    assert f.predict("edge", compacted, tail, "a").cached_prompt_tokens == round(len(HEAD) / ratio)
    # another key never seen by the tier: nothing cached is predicted
    assert f.predict("edge", prefix(3), tail, "b").cached_prompt_tokens == 0
    # and another tier has learnt nothing yet
    assert f.predict("cloud", compacted, tail, "a") == Usage(round(len(compacted + tail) / 4), 0, 0)


def test_keys_remembered_are_bounded_least_recently_used_first():
    f = Forecast(max_keys=2)
    for k in ("a", "b", "c"):
        f.observe("edge", prefix(4), "t", Usage(40, 0, 5), k)
    assert f.predict("edge", prefix(5), "t", "a").cached_prompt_tokens == 0  # "a" left first
    assert f.predict("edge", prefix(5), "t", "c").cached_prompt_tokens > 0
