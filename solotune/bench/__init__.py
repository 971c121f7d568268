"""``solotune bench`` (measure peak memory, runtime and the memory anatomy over a matrix of
techniques) and ``solotune plan`` (predict them from formulas): plan.py, anatomy.py, cell.py,
hf_cell.py, runner.py, report.py, commands.py."""
