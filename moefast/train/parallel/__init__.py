"""Data parallelism on ``torch.distributed`` (:mod:`moefast.train.parallel.data_parallel`).

Owns: the process group, each rank's slice of a global batch, the sparse row exchange, the
sharded evaluation and the agreement on stopping. Never imports the loop
(:mod:`moefast.train.loop`) that drives it, nor :mod:`moefast.experiments`.
"""
