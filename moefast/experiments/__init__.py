"""Experiments on top of training: the grid (:mod:`moefast.experiments.grid`) and the claims
report (:mod:`moefast.experiments.claims`).

Owns: plans of many runs, their shared tables and reports, and their statistics. Imports
:mod:`moefast.train`, :mod:`moefast.runs` and the data sources; nothing below imports it (only
the command line does).
"""
