"""Everything a run directory is on disk.

Owns: the name of every file a run directory holds (:mod:`moefast.runs.files`), the one writer
every output goes through (:mod:`moefast.runs.writer`: atomic replacement, ``fsync``, the
fault-injection points the kill tests use), claiming and locking a
run directory and the files it holds (:mod:`moefast.runs.rundir`), the one settings record a
resume, a grid and the claims are checked against (:mod:`moefast.runs.settings`), checkpoints (:mod:`moefast.runs.checkpoint`), the
resume snapshot (:mod:`moefast.runs.snapshot`), the data's record ``dataset.json``
(:mod:`moefast.runs.records`) and reading a finished run back into its trained model
(:mod:`moefast.runs.read`, what ``export``, ``predict`` and serving start from).

Never imports: :mod:`moefast.train`'s loop or data parallelism, :mod:`moefast.experiments`, the
command line. Training imports this package, not the other way round. The writer and the file
names import nothing of moefast: every room writes through the one and names its files by the
other, the data's cache and ``vocab.json`` included.
"""
