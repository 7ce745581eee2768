"""Experiment harnesses built on the pipeline stages (not stages themselves): the skill world (``world``).

A harness may compose any stage; no stage and nothing in ``stages.engine`` imports from here.
"""
