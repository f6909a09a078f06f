"""Demo datasets (Fashion-MNIST, MNIST without a download) and small training loops, used by the demo,
the examples, the benchmarks and the command line's ``--dataset``; not part of the pruning core."""
