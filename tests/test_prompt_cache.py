"""The prompt cache model: chained blocks, TTL, LRU bound, prediction and its correction."""

import json

from hypothesis import given
from hypothesis import strategies as st

from cooldown.estimate import parse_request
from cooldown.prompt_cache import PromptCache, block_keys

CHAT = "/v1/chat/completions"


def segments(*sizes: int, salt: int = 0) -> list[tuple[int, int]]:
    return [(hash((salt, i)), size) for i, size in enumerate(sizes)]


def chat_shape(messages, **extra):
    body = {"model": "m", "messages": messages, **extra}
    return parse_request(CHAT, json.dumps(body), segments=True)


def test_only_full_blocks_have_keys():
    assert len(block_keys("m", segments(100, 100, 55), 128)) == 1  # 255 tokens: 1 full block
    assert len(block_keys("m", segments(100, 100, 56), 128)) == 2
    assert len(block_keys("m", segments(127), 128)) == 0
    assert len(block_keys("m", segments(128), 128)) == 1
    assert len(block_keys("m", segments(1000), 128)) == 7


def test_a_changed_segment_changes_every_block_from_the_one_it_touches():
    a = block_keys("m", segments(300, 300, 300), 128)
    changed = segments(300, 300, 300)
    changed[1] = (hash("other"), 300)
    b = block_keys("m", changed, 128)
    # Blocks 0 and 1 end in the first segment (at 128 and 256); block 2 ends at 384, in the
    # second: from there on nothing matches.
    assert a[:2] == b[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))


def test_models_do_not_share_blocks():
    assert set(block_keys("a", segments(512), 128)).isdisjoint(block_keys("b", segments(512), 128))


def test_a_recorded_prefix_is_predicted_and_expires_after_the_ttl():
    cache = PromptCache(block_tokens=128, ttl=300.0, max_blocks=1000)
    first = cache.keys_for("m", segments(1000, 40))
    cache.record(first, now=0.0)
    longer = cache.keys_for("m", segments(1000, 40, 500))  # the next turn: the same, and more
    assert cache.predict("m", longer, now=10.0, limit=1540).cached == 8 * 128  # 1040 // 128
    assert cache.predict("m", longer, now=300.0, limit=1540).cached == 0  # expired
    assert cache.predict("m", longer, now=10.0, limit=500).cached == 500  # never above input


def test_a_hit_needs_every_block_before_it():
    cache = PromptCache(max_blocks=1000)
    keys = cache.keys_for("m", segments(1024))
    cache.record(keys[1:], now=0.0)  # everything but the first block
    assert cache.predict("m", keys, now=1.0, limit=1024).raw == 0


def test_recording_again_refreshes_the_ttl():
    cache = PromptCache(ttl=300.0, max_blocks=1000)
    keys = cache.keys_for("m", segments(512))
    cache.record(keys, now=0.0)
    cache.record(keys, now=200.0)
    assert cache.predict("m", keys, now=450.0, limit=512).raw == 512


def test_the_lru_keeps_at_most_max_blocks_and_drops_the_oldest():
    cache = PromptCache(max_blocks=10)
    old = cache.keys_for("m", segments(128 * 6, salt=1))
    new = cache.keys_for("m", segments(128 * 6, salt=2))
    cache.record(old, now=0.0)
    cache.record(new, now=1.0)
    assert len(cache) == 10
    assert cache.predict("m", new, now=2.0, limit=10_000).raw == 6 * 128
    assert cache.predict("m", old, now=2.0, limit=10_000).raw == 0  # its first blocks are gone


def test_over_prediction_is_learnt_and_scales_later_predictions_down():
    cache = PromptCache(max_blocks=1000)
    keys = cache.keys_for("m", segments(1280))
    cache.record(keys, now=0.0)
    guess = cache.predict("m", keys, now=1.0, limit=1280)
    assert guess.cached == guess.raw == 1280
    for _ in range(10):
        cache.learn("m", guess, reported=640)  # upstream finds half of what the blocks say
    assert cache.predict("m", keys, now=1.0, limit=1280).cached == 640
    accuracy = cache.accuracy("m")
    assert accuracy is not None and accuracy["correction"] == 0.5


def test_under_prediction_and_misses_never_raise_the_prediction():
    cache = PromptCache(max_blocks=1000)
    keys = cache.keys_for("m", segments(1280))
    cache.record(keys, now=0.0)
    guess = cache.predict("m", keys, now=1.0, limit=1280)
    cache.learn("m", guess, reported=1280 + 500)  # more than predicted: traffic we did not see
    miss = cache.predict("m", cache.keys_for("m", segments(1280, salt=9)), now=1.0, limit=1280)
    cache.learn("m", miss, reported=1000)
    assert cache.predict("m", keys, now=1.0, limit=1280).cached == 1280


def test_an_upstream_without_a_cache_brings_predictions_to_zero():
    cache = PromptCache(max_blocks=1000)
    keys = cache.keys_for("m", segments(1280))
    cache.record(keys, now=0.0)
    for _ in range(5):
        cache.learn("m", cache.predict("m", keys, now=1.0, limit=1280), reported=0)
    assert cache.predict("m", keys, now=1.0, limit=1280).cached == 0


def test_a_new_block_size_forgets_the_blocks():
    cache = PromptCache(block_tokens=128, max_blocks=1000)
    cache.record(cache.keys_for("m", segments(1024)), now=0.0)
    cache.resize(block_tokens=64, ttl=300.0, max_blocks=1000)
    assert len(cache) == 0


def test_chat_segments_add_up_to_the_input_estimate_and_share_a_growing_prefix():
    system = {"role": "system", "content": "You are a careful agent. " * 200}
    tools = [{"type": "function", "function": {"name": "read", "parameters": {}}}]
    turn1 = chat_shape([system, {"role": "user", "content": "step one"}], tools=tools)
    turn2 = chat_shape(
        [
            system,
            {"role": "user", "content": "step one"},
            {"role": "assistant", "content": "done " * 40},
            {"role": "user", "content": "step two " * 60},
        ],
        tools=tools,
    )
    for shape in (turn1, turn2):
        assert sum(tokens for _, tokens in shape.segments) == shape.input_tokens
    cache = PromptCache(max_blocks=1000)
    cache.record(cache.keys_for("m", turn1.segments), now=0.0)
    predicted = cache.predict("m", cache.keys_for("m", turn2.segments), 1.0, turn2.input_tokens)
    # Every full block of turn 1 before its reply priming is found again.
    assert predicted.raw == (turn1.input_tokens - 3) // 128 * 128 > 0


def test_segments_are_only_rendered_when_asked_for():
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    assert parse_request(CHAT, body).segments == ()
    assert parse_request(CHAT, body, segments=True).segments != ()


@given(
    prefix=st.lists(st.integers(1, 400), min_size=1, max_size=8),
    first=st.lists(st.integers(1, 400), max_size=4),
    second=st.lists(st.integers(1, 400), max_size=4),
    block=st.sampled_from([16, 64, 128]),
)
def test_prediction_is_exactly_the_full_blocks_of_the_shared_prefix(prefix, first, second, block):
    """Whatever two prompts share, once the first is recorded the second is predicted exactly
    the full blocks of their common prefix of segments: no more (a block that ends after it
    depends on a segment they do not share), no less."""
    a = segments(*prefix) + segments(*first, salt=1)
    b = segments(*prefix) + segments(*second, salt=2)
    cache = PromptCache(block_tokens=block, ttl=300.0, max_blocks=100_000)
    cache.record(cache.keys_for("m", a), now=0.0)
    total_b = sum(tokens for _, tokens in b)
    got = cache.predict("m", cache.keys_for("m", b), now=1.0, limit=total_b).raw
    assert got == sum(prefix) // block * block
