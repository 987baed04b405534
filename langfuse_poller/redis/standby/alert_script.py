"""The alert state's keys in Redis and the one fenced script that writes them (`APPLY`).

`RedisAlertStore` (alert_state.py) collects a transaction's changes as a list of operations and hands them to
`APPLY`, which checks the lease's fencing token first and then writes them all, or nothing. Every key is built
from the deployment's prefix (`PollerKeys.prefix`), so on a Redis Cluster every key it touches shares the
deployment's hash tag and slot; the script names the token key only (what it reads first), and builds the
rest from the prefix it is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from ...events import Event
from .keys import PollerKeys

# KEYS: token; ARGV: our token, key prefix, JSON list of operations. {1, token} when written, {0, token} when a
# later token was issued (nothing written). Numbers travel as strings, as in COMMIT.
APPLY = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then return {0, current} end
local p = ARGV[2]
for _, op in ipairs(cjson.decode(ARGV[3])) do
  if op.op == 'save' then
    redis.call('HSET', p .. ':alert-groups', op.f, op.v)
    redis.call('HSET', p .. ':alert-states', op.f, op.s)
    redis.call('SADD', p .. ':alert-keys:' .. op.r, op.f)
    if op.due == '' then redis.call('ZREM', p .. ':alert-due', op.f)
    else redis.call('ZADD', p .. ':alert-due', op.due, op.f) end
  elseif op.op == 'adopt' then
    if redis.call('HSETNX', p .. ':alert-groups', op.f, op.v) == 1 then
      redis.call('HSET', p .. ':alert-states', op.f, op.s)
      redis.call('SADD', p .. ':alert-keys:' .. op.r, op.f)
      if op.due ~= '' then redis.call('ZADD', p .. ':alert-due', op.due, op.f) end
    end
  elseif op.op == 'del' then
    redis.call('HDEL', p .. ':alert-groups', op.f)
    redis.call('HDEL', p .. ':alert-states', op.f)
    redis.call('ZREM', p .. ':alert-due', op.f)
    redis.call('SREM', p .. ':alert-keys:' .. op.r, op.f)
  elseif op.op == 'start' then
    redis.call('HSETNX', p .. ':alert-rules', op.r, op.at)
  elseif op.op == 'see' then
    local h = p .. ':alert-values:' .. op.r
    for i, k in ipairs(op.k) do
      local old = redis.call('HGET', h, k)
      if not old or tonumber(old) < tonumber(op.v[i]) then
        redis.call('HSET', h, k, op.v[i])
        redis.call('ZADD', h .. ':by-time', op.v[i], k)
      end
    end
  elseif op.op == 'forget' then
    local h = p .. ':alert-values:' .. op.r
    for _, k in ipairs(redis.call('ZRANGEBYSCORE', h .. ':by-time', '-inf', '(' .. op.before)) do
      redis.call('HDEL', h, k)
    end
    redis.call('ZREMRANGEBYSCORE', h .. ':by-time', '-inf', '(' .. op.before)
  elseif op.op == 'drop' then
    redis.call('HDEL', p .. ':alert-rules', op.r)
    redis.call('UNLINK', p .. ':alert-values:' .. op.r, p .. ':alert-values:' .. op.r .. ':by-time')
  elseif op.op == 'take' then
    redis.call('LTRIM', p .. ':alert-matches', op.n, -1)
  elseif op.op == 'notice' then
    if redis.call('HSETNX', p .. ':alert-outbox', op.id, op.v) == 1 then
      redis.call('ZADD', p .. ':alert-outbox-due', op.at, op.id)
    end
  elseif op.op == 'retry' then
    redis.call('HSET', p .. ':alert-outbox', op.id, op.v)
    redis.call('ZADD', p .. ':alert-outbox-due', op.at, op.id)
  elseif op.op == 'sent' or op.op == 'dead' then
    redis.call('HDEL', p .. ':alert-outbox', op.id)
    redis.call('ZREM', p .. ':alert-outbox-due', op.id)
    if op.op == 'dead' then redis.call('RPUSH', p .. ':alert-dead', op.v) end
  end
end
return {1, current}
"""


class AlertKeys:
    """The alert state's keys, all built from the poller keys' prefix (so they follow it wherever it goes)."""

    def __init__(self, keys: PollerKeys) -> None:
        self.poller = keys
        prefix = keys.prefix
        self.prefix = prefix
        self.groups = f"{prefix}:alert-groups"
        # field -> the group's state alone: what counts and filters read, without parsing windows of tens of kB
        self.states = f"{prefix}:alert-states"
        self.due = f"{prefix}:alert-due"
        self.matches = f"{prefix}:alert-matches"
        self.outbox = f"{prefix}:alert-outbox"
        self.outbox_due = f"{prefix}:alert-outbox-due"
        self.dead = f"{prefix}:alert-dead"
        # rule-level state: a set of each rule's group fields (what `max_groups` counts), when each new_value
        # rule first ran, and the values each knows (hash value key -> last seen, with a sorted set by it)
        self.rules = f"{prefix}:alert-rules"

    def rule_groups(self, rule: str) -> str:
        return f"{self.prefix}:alert-keys:{rule}"

    def values(self, rule: str) -> str:
        return f"{self.prefix}:alert-values:{rule}"


def group_field(rule: str, key: str) -> str:
    """A group's field in the groups hash and the due set."""
    return json.dumps([rule, key], ensure_ascii=False)


def match_entry(target: str, event: Event) -> str:
    """One match as an item of the matches list (what COMMIT and `keep_matches` push)."""
    return json.dumps({"t": target, "e": event.to_json()}, ensure_ascii=False)


def notice_group(notice_id: str) -> tuple[str, int]:
    """(the life of the group, the notification's seq) from an id `rule.<status>:<rule>:<key>:<opened>:<seq>`."""
    head, _, seq = notice_id.rpartition(":")
    _, _, life = head.partition(":")
    try:
        return life, int(seq)
    except ValueError:
        return notice_id, 0


def first_of_each_group(notice_ids: Iterable[str]) -> dict[str, tuple[int, str]]:
    """For each group life with notifications waiting, the (seq, id) of its earliest."""
    first: dict[str, tuple[int, str]] = {}
    for notice_id in notice_ids:
        life, seq = notice_group(notice_id)
        first[life] = min(first.get(life, (seq, notice_id)), (seq, notice_id))
    return first


def number(value: float) -> str:
    return repr(float(value))
