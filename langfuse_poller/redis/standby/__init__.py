"""Standby pollers: several `run` processes share one Redis; one holds a lease and polls, the others wait.

* `keys`: where the shared poller state lives in Redis, beside the BullMQ queue.
* `lease`: the lease itself, a Redis key with an expiry and a fencing token that only grows.
* `shared_state`: the watermarks and dedup keys in Redis, written only by the holder of the newest token.
* `replica`: one process's part: standby or leader, renewing, stepping down, taking over.
* `report`: what `status` and the metrics read about the lease, the replicas, the queue and its workers.

With `[queue] standby = false` (the default) none of this runs.
"""
