"""Command-line tools of dsran_jax (run as `python -m dsran_jax.tools.<name>`)."""
