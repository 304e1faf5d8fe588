"""The flags of the data-parallel runs that must draw what one process draws (tests/system/
test_parallel.py on one host, test_docker_mpi.py across two containers): dropout and --augment keyed
by the row's place in the global batch; hidden sizes not multiples of 4; 502 training rows in
batches of 20 (ranks of 10/10, or 6/7/7; a last batch of 2 rows leaves rank 0 of 3 without rows,
which must still draw its mask keys and distortions)."""

RANDOM_FLAGS = [
    "--hidden", "30", "14", "--epochs", "2", "--batch-size", "20", "--val-size", "98",
    "--no-plots", "--device", "cpu", "--dropout", "0.3", "--augment", "--schedule", "constant",
]  # fmt: skip
