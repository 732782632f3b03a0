"""Training: the loop as named steps, the attention monitor, and where and how it runs."""
