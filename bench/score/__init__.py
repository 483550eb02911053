"""``python -m bench.score``: folders of images scored with the harness' own metric classes.

Modules, one job each: ``pairing`` (which files belong together), ``images`` (reading and
checking them in the harness' tensor convention), ``inputs`` (which folders each metric needs),
``scoring`` (feeding the metrics as ``bench.evaluate`` does), ``outputs`` (table, JSON, MLflow),
``__main__`` (the command line).
"""
