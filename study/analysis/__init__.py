"""The analysis layer: pure statistics, and the comparisons, diagnostics, interaction (C6) and
inference (C7) analyses built on them, from the tidy `table.RunTable`.
"""
