"""Alerting: rules that group matches into alerts, frequency and absence rules, and silences."""
