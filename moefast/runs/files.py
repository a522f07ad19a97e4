"""The names of every file a run directory holds, each named once (issue 25).

::

    <run>/.moefast-run             MARKER: the claim and lock of the directory (rundir.py)
    <run>/config.toml              CONFIG_TOML: the command line's options, for --resume (cli)
    <run>/config.json              CONFIG_JSON: older runs only (their configuration; read back, not written)
    <run>/settings.json            SETTINGS: the one record of how the run started (settings.py)
    <run>/resume.pt                SNAPSHOT: the resume snapshot (snapshot.py)
    <run>/checkpoints/             CHECKPOINTS: one checkpoint per stage (checkpoint.py)
    <run>/metrics.json             METRICS: the run's metrics
    <run>/predictions.csv          PREDICTIONS: the test split's scores (in memory)
    <run>/predictions.parquet      STREAMED_PREDICTIONS: the same, of a streamed log
    <run>/vocab.json               VOCAB: a table's vocabularies (moefast.data.vocab)
    <run>/dataset.json             DATASET_RECORD: the data a run was trained on (export)
    <run>/<method>/data.json       DATA_REFERENCE: a method's pointer to its run's vocab.json
    <run>/val_auc.png              VAL_AUC_PLOT, PER_DOMAIN_AUC_PLOT, GATE_WEIGHTS_PLOT: the plots
    <run>/table.txt                TABLE: the command line's table of the methods

The older names stay importable where they were (``moefast.runs.rundir.MARKER``,
``moefast.runs.snapshot.SNAPSHOT``, ``moefast.data.vocab.VOCAB_FILE``...): they are these.
``tests/test_run_files.py`` refuses these names written out anywhere else in ``moefast/``.

Imports nothing: every layer may use it, the data's ``vocab.json`` included.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINTS",
    "CONFIG_JSON",
    "CONFIG_TOML",
    "DATASET_RECORD",
    "DATA_REFERENCE",
    "GATE_WEIGHTS_PLOT",
    "MARKER",
    "METRICS",
    "PER_DOMAIN_AUC_PLOT",
    "PREDICTIONS",
    "RUN_FILES",
    "SETTINGS",
    "SNAPSHOT",
    "STREAMED_PREDICTIONS",
    "TABLE",
    "VAL_AUC_PLOT",
    "VOCAB",
]

MARKER = ".moefast-run"
CONFIG_TOML = "config.toml"
CONFIG_JSON = "config.json"
SETTINGS = "settings.json"
SNAPSHOT = "resume.pt"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
STREAMED_PREDICTIONS = "predictions.parquet"
VOCAB = "vocab.json"
DATASET_RECORD = "dataset.json"
DATA_REFERENCE = "data.json"
VAL_AUC_PLOT = "val_auc.png"
PER_DOMAIN_AUC_PLOT = "per_domain_auc.png"
GATE_WEIGHTS_PLOT = "gate_weights.png"
TABLE = "table.txt"

# Every name above, for the test that keeps them named once.
RUN_FILES = (MARKER, CONFIG_TOML, CONFIG_JSON, SETTINGS, SNAPSHOT, CHECKPOINTS, METRICS, PREDICTIONS,
             STREAMED_PREDICTIONS, VOCAB, DATASET_RECORD, DATA_REFERENCE, VAL_AUC_PLOT, PER_DOMAIN_AUC_PLOT,
             GATE_WEIGHTS_PLOT, TABLE)
