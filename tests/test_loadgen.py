"""The load generator (tools/loadgen.py) counts what really happened, and draws it.

A load test is only as good as its bookkeeping: if the generator mislabels a proxy refusal as
an upstream 429, or loses requests, every conclusion about the proxy drawn from it is wrong. So
the end-to-end test checks the generator's counts against the mock upstream's own counters, and
the unit tests pin down classification, percentiles and the 60-second windows.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tools import loadgen as loadgen_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def loadgen() -> ModuleType:
    return loadgen_module


@pytest.fixture
def mock(mock_cerebras_module: ModuleType) -> Any:
    """A small account: 600 RPM, 20K TPM, so a few seconds of load overflow its token bucket."""
    settings = mock_cerebras_module.MockSettings(rpm=600, tpm=20_000, context_length=8192)
    server = mock_cerebras_module.MockCerebras(settings, port=0).start()
    try:
        yield server
    finally:
        server.stop()


def test_cli_against_the_mock_counts_match_upstream(
    loadgen: ModuleType, mock: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """~3 s at 20 req/s (~1,300 tokens each) is ~4x the 20K bucket: some upstream 429s."""
    png, raw = tmp_path / "x.png", tmp_path / "run.json"
    status = loadgen.main(
        [
            "--target=direct",
            f"--url={mock.url}/v1/chat/completions",
            "--rate=20",
            "--arrivals=even",
            "--duration=3",
            "--seed=7",
            "--tpm-limit=20000",
            "--rpm-limit=600",
            "--timeout=10",
            "--drain=10",
            "--quiet",
            f"--plot={png}",
            f"--json={raw}",
        ]
    )
    assert status == 0

    data = json.loads(raw.read_text())
    summary, records = data["summary"], data["records"]
    upstream = mock.stats()
    assert summary["sent"] == len(records) == upstream["requests"]
    assert summary["sent"] >= 50  # 3 s at 20/s, even arrivals
    assert summary["sent"] == (
        summary["ok"] + summary["refused"] + summary["upstream_429"] + summary["errors"]
    )
    assert summary["upstream_429"] > 0
    assert summary["upstream_429"] == upstream["rate_limited"]
    assert summary["upstream_429_by_code"] == {"token_quota_exceeded": summary["upstream_429"]}
    assert summary["ok"] == upstream["ok"] > 0
    assert summary["refused"] == 0 and summary["errors"] == 0  # no proxy in between
    assert {r["index"] for r in records} == set(range(len(records)))
    assert data["settings"]["seed"] == 7

    # The ok answers' tokens cannot exceed what the bucket held plus ~3 s of refill.
    assert 0 < summary["peak_tokens_per_min_60s"] <= 20_000 + 20_000 * 4 / 60
    assert summary["ok_tokens"] == sum(r["total_tokens"] for r in records if r["outcome"] == "ok")
    small, large = summary["by_class"]["small"], summary["by_class"]["large"]
    assert small["sent"] + large["sent"] == summary["sent"]
    assert small["sent"] > large["sent"]  # 70/30 mix
    assert small["ok"] and small["latency_p50"] <= small["latency_p95"]

    content = png.read_bytes()
    assert content.startswith(PNG_MAGIC)
    assert len(content) > 20_000  # two labelled plots, not an empty canvas

    out = capsys.readouterr().out
    assert "Load summary" in out and "upstream 429" in out


def test_run_load_sizes_match_what_upstream_counts(
    loadgen: ModuleType, mock: Any, tmp_path: Path
) -> None:
    """Within the limits everything is ok, and each prompt costs what the generator says."""
    settings = loadgen.Settings(
        target="direct",
        url=f"{mock.url}/v1/chat/completions",
        rate=50,
        arrivals="even",
        requests=12,
        small_share=0.5,
        small=loadgen.SizeRange(100, 300),
        large=loadgen.SizeRange(1_000, 1_200),
        seed=3,
        timeout=10,
        quiet=True,
    )
    summary = loadgen.run_load(settings)
    assert summary.sent == summary.ok == 12
    assert mock.stats()["ok"] == 12
    completion = mock.settings.completion_tokens
    for record in summary.records:
        # The mock counts prompts with the same tokenizer and template, so this is exact.
        expected = record.input_tokens + min(completion, record.max_completion_tokens)
        assert record.total_tokens == expected
        size = settings.small if record.size_class == "small" else settings.large
        assert size.low * 0.95 <= record.estimated_tokens <= size.high * 1.05
        # 70 % input / 30 % max_completion_tokens, up to the prompt's few-token rounding.
        share = record.max_completion_tokens / record.estimated_tokens
        assert share == pytest.approx(0.3, abs=0.02)


def _record(loadgen: ModuleType, index: int, size_class: str, **fields: Any) -> Any:
    values = {"estimated_tokens": 500, "scheduled": 0.0, "sent": 0.0, **fields}
    return loadgen.Record(index=index, size_class=size_class, **values)


def test_classify_tells_proxy_refusals_from_upstream_429s(loadgen: ModuleType) -> None:
    refused_body = {
        "error": {"message": "...", "type": "cooldown_queue_full", "code": "queue_full"}
    }
    assert loadgen.classify(429, {"X-Cooldown-Refused": "queue_full"}, refused_body) == (
        "refused",
        "queue_full",
    )
    assert loadgen.classify(503, {"x-cooldown-refused": "circuit_open"}, {}) == (
        "refused",
        "circuit_open",
    )
    cerebras_429 = {"message": "Tokens per minute ...", "code": "token_quota_exceeded"}
    assert loadgen.classify(429, {"x-ratelimit-limit-tokens-minute": "1"}, cerebras_429) == (
        "upstream_429",
        "token_quota_exceeded",
    )
    assert loadgen.classify(200, {}, {"usage": {"total_tokens": 5}}) == ("ok", None)
    assert loadgen.classify(502, {}, {}) == ("http_error", "http_502")


def test_summarize_counts_percentiles_and_windows(loadgen: ModuleType) -> None:
    records = [
        # small ok answers with latencies 1..5 s, 100 tokens each, answered at 1, 12, 23, 34, 45 s
        *(
            _record(loadgen, i, "small", sent=10.0 * i, answered=10.0 * i + (i + 1),
                    status=200, outcome="ok", total_tokens=100)
            for i in range(5)
        ),
        # large ok answers with latencies 10 s and 20 s, 1,000 tokens each
        _record(loadgen, 5, "large", sent=50.0, answered=60.0, status=200, outcome="ok",
                total_tokens=1000),
        _record(loadgen, 6, "large", sent=55.0, answered=75.0, status=200, outcome="ok",
                total_tokens=1000),
    ]  # fmt: skip
    outcome, code = loadgen.classify(429, {"X-Cooldown-Refused": "queue_full"}, {})
    records += [
        _record(loadgen, 7, "large", sent=56.0, answered=56.5, status=429, outcome=outcome,
                code=code),
        _record(loadgen, 8, "small", sent=57.0, answered=58.0, status=429,
                outcome="upstream_429", code="token_quota_exceeded"),
        _record(loadgen, 9, "small", sent=58.0, answered=88.0, outcome="transport_error",
                code="ReadTimeout"),
        _record(loadgen, 10, "large", sent=59.0, answered=120.0, outcome="unfinished",
                code="unfinished"),
    ]  # fmt: skip

    summary = loadgen.summarize(records, tpm_limit=3000, rpm_limit=10)
    assert summary.sent == 11
    assert summary.ok == 7
    assert summary.refused == 1 and summary.refused_by_code == {"queue_full": 1}
    assert summary.upstream_429 == 1
    assert summary.upstream_429_by_code == {"token_quota_exceeded": 1}
    # The one still outstanding at the end was abandoned by the load generator: not an error.
    assert summary.errors == 1
    assert summary.errors_by_kind == {"ReadTimeout": 1}
    assert summary.abandoned == 1
    assert summary.sent == (
        summary.ok + summary.refused + summary.upstream_429 + summary.errors + summary.abandoned
    )

    small, large = summary.by_class["small"], summary.by_class["large"]
    assert (small.sent, small.ok, large.sent, large.ok) == (7, 5, 4, 2)
    assert small.latency_p50 == pytest.approx(3.0)
    assert small.latency_p95 == pytest.approx(4.8)  # linear between 4 and 5
    assert small.latency_max == pytest.approx(5.0)
    assert large.latency_p50 == pytest.approx(15.0)
    assert large.latency_p95 == pytest.approx(19.5)

    # Duration runs to the last event (120 s): 2,500 ok tokens in 2 minutes.
    assert summary.duration_s == pytest.approx(120.0)
    assert summary.ok_tokens == 2500
    assert summary.tokens_per_min == pytest.approx(1250.0)
    # Busiest (t-60, t] window by answer time: answers at 23, 34, 45, 60, 75 -> 2,300 tokens.
    assert summary.peak_tokens_per_min_60s == pytest.approx(2300.0)
    assert summary.peak_tokens_59s == pytest.approx(2300.0)  # (16, 75]: the same answers
    assert summary.peak_requests_per_min_60s == pytest.approx(6.0)  # answers at 1..60 s
    assert summary.peak_requests_59s == pytest.approx(5.0)  # 1 s and 60 s are 59 s apart
    assert summary.ok_requests_per_min == pytest.approx(3.5)
    assert summary.to_dict()["refused_by_code"] == {"queue_full": 1}
    assert "records" not in summary.to_dict()


def test_windows_and_outstanding_series(loadgen: ModuleType) -> None:
    assert loadgen.peak_window_sum([(0.0, 1), (30.0, 1), (60.0, 1), (61.0, 1)]) == 3
    assert loadgen.peak_window_sum([]) == 0
    assert loadgen.percentile([], 0.5) is None

    records = [
        _record(loadgen, 0, "small", sent=0.5, answered=2.5, outcome="ok", total_tokens=10),
        _record(loadgen, 1, "small", sent=1.0, answered=61.5, outcome="ok", total_tokens=5),
    ]
    seconds, tokens = loadgen.rolling_tokens_per_minute(records, 63)
    assert seconds[:4] == [0, 1, 2, 3] and tokens[:4] == [0, 0, 0, 10]
    assert tokens[62] == 15 and tokens[63] == 5  # the first answer left the window at 62.5
    times, outstanding = loadgen.outstanding_steps(records)
    assert list(zip(times, outstanding, strict=True)) == [
        (0.0, 0),
        (0.5, 1),
        (1.0, 2),
        (2.5, 1),
        (61.5, 0),
    ]


def test_the_picture_draws_both_limits_that_can_bind(loadgen: ModuleType) -> None:
    """An rpm-bound run looks flat on the tokens panel; its own panel shows why."""
    records = [
        _record(loadgen, i, "small", sent=float(i), answered=i + 0.5, outcome="ok", total_tokens=10)
        for i in range(30)
    ]
    settings = loadgen.Settings(target="direct", rpm_limit=30)
    fig = loadgen.draw(records, 60_000, settings=settings)
    labels = [label for axis in fig.axes for label in axis.get_legend_handles_labels()[1]]
    assert "TPM limit (60,000)" in labels and "RPM limit (30)" in labels
    _, requests = loadgen.rolling_requests_per_minute(records, 31)
    assert requests[30] == 30 and requests[10] == 10


def test_plot_writes_a_png_without_limits_or_answers(loadgen: ModuleType, tmp_path: Path) -> None:
    records = [_record(loadgen, 0, "small", sent=0.2, outcome="unfinished", answered=None)]
    path = loadgen.plot(records, tmp_path / "sub" / "empty.png", None)
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_settings_are_bounded(loadgen: ModuleType) -> None:
    with pytest.raises(ValueError, match="requests must be"):
        loadgen.Settings(target="direct", requests=loadgen.MAX_REQUESTS + 1).resolved()
    with pytest.raises(ValueError, match="duration must be"):
        loadgen.Settings(target="direct", duration=loadgen.MAX_DURATION + 1).resolved()
    with pytest.raises(ValueError, match="no such file"):
        loadgen.Settings(target="proxy", ca="/nonexistent/ca.pem", requests=1).resolved()
    resolved = loadgen.Settings(target="direct").resolved()
    assert resolved.duration == loadgen.DEFAULT_DURATION and resolved.seed is not None
    assert resolved.url == loadgen.DIRECT_URL
    with pytest.raises(SystemExit):
        loadgen.main(["--target=direct", "--small=1000-100", "--quiet"])
    assert loadgen.split_size(1000) == (700, 300)


async def test_the_agent_workload_grows_sessions_over_a_shared_prefix():
    """Straight to a mock with the prompt cache: sessions of one team find the team's prefix
    and their own earlier turns cached, and the summary adds them up."""
    from tools import agents, mock_cerebras

    settings = mock_cerebras.MockSettings(rpm=None, tpm=None, prompt_cache=True)
    with mock_cerebras.MockCerebras(settings) as mock:
        summary = await agents.run_agents(
            agents.AgentSettings(
                sessions=2,
                teams=1,
                prefix_tokens=600,
                turn_low=100,
                turn_high=200,
                max_context_tokens=100_000,
                duration=0.5,
                target="direct",
                url=f"{mock.url}/v1/chat/completions",
            )
        )
    turns = sorted(summary.turns, key=lambda t: (t.session, t.sent))
    assert all(t.outcome == "ok" for t in turns) and len(turns) >= 4
    firsts = {session: min(t.sent for t in turns if t.session == session) for session in (0, 1)}
    later = [t for t in turns if t.sent > firsts[t.session]]
    assert later and all((t.cached_tokens or 0) >= 512 for t in later)  # the prefix, at least
    figures = summary.figures()
    assert figures["cached_tokens"] == sum(t.cached_tokens or 0 for t in turns)
    assert figures["predicted_over_reported"] is None  # no proxy, no prediction
