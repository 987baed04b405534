"""Property tests of the window and dedup logic: any arrival order and delay within the lookback gives each
event exactly once, whatever the poll schedule."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from langfuse_poller.registry import Registry
from langfuse_poller.runtime import Runtime
from langfuse_poller.testing.fake_langfuse import FakeLangfuse

from .conftest import Clock, make_config

LOOKBACK = 120.0

record = st.tuples(
    st.floats(min_value=0, max_value=200),  # when the record starts, seconds after the poller's start
    st.floats(min_value=0, max_value=LOOKBACK - 1),  # how long after its start it becomes visible
    st.sampled_from(["scores", "observations"]),
    st.booleans(),  # whether the record is updated later (a new version, same id)
)
schedule = st.lists(st.floats(min_value=0.5, max_value=40), min_size=1, max_size=25)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(record, max_size=25), gaps=schedule, reread=st.sampled_from([[], ["30s"], ["10s", "1m"]]))
def test_each_event_exactly_once(
    records: list[tuple[float, float, str, bool]], gaps: list[float], reread: list[str]
) -> None:
    clock = Clock(1_800_000_000.0)
    t0 = clock.now
    with tempfile.TemporaryDirectory() as tmp, FakeLangfuse(clock=clock) as fake:
        tmp_path = Path(tmp)
        config = make_config(
            fake,
            tmp_path,
            poll={"start": "now", "lookback": "2m", "reread": reread, "sweep_interval": "15s", "settle": "0s"},
        )
        runtime = Runtime.build(config, handlers=Registry(), clock=clock)
        runtime.poller.start_streams()
        expected: set[str] = set()
        # add each record at the moment of its start: visible `delay` later (the order of adding is the order
        # of starts; visibility, the order that matters, is shuffled by the delays)
        pending = sorted(records)
        try:
            elapsed = 0.0
            for gap in [*gaps, *([20.0] * 20)]:  # the schedule, then long enough for every sweep to pass
                elapsed += gap
                while pending and pending[0][0] <= elapsed:
                    start, delay, kind, updated = pending.pop(0)
                    clock.now = t0 + start
                    started = datetime.fromtimestamp(clock.now, UTC)
                    if kind == "scores":
                        score = fake.add_score(timestamp=started, visible_after=delay)
                        expected.add(f"score.created:{score['id']}")
                        if updated:
                            fake.update_score(score["id"], value=0.5, visible_after=delay)
                    else:
                        trace = fake.add_trace(start_time=started, observations=1, visible_after=delay)
                        expected.add(f"trace.created:{trace[0]['traceId']}")
                        expected.add(f"generation.created:{trace[1]['id']}")
                clock.now = t0 + elapsed
                result = runtime.poller.poll_once()
                assert not result.errors
                runtime.worker.run_until_idle()
        finally:
            runtime.close()
        path = tmp_path / "events.jsonl"
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []
        created = [i for i in ids if not i.startswith(("score.updated", "trace.updated"))]
        assert sorted(created) == sorted(expected)  # every created event, each exactly once
        assert len(ids) == len(set(ids))  # and no update twice either
