"""What was tried on the way to the library's kernels, kept runnable for bench/ (README.md: the log)."""
