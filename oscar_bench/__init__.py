"""oscar-bench: the server's and the client's work on full-size architectures (random weights), timed
against baselines in the same process; see :mod:`oscar_bench.cli`."""
