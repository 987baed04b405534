"""The daemon and its operations: scheduling, systemd, reloads, metrics, logs, status, check, demo."""
