"""Small pieces every layer uses: durations, backoff, listen addresses, TOML tables, the secrets that logs
mask, the state's lock file. They import nothing of the package but errors and each other
(tests/test_imports.py holds them to it)."""
