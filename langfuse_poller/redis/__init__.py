"""The Redis backend: the BullMQ queue and its workers, shared silences, standby pollers."""
