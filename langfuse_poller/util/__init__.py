"""Small pieces every layer uses: durations, backoff, listen addresses. They import nothing above them."""
