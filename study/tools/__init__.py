"""Tools around the harness: the benchmarks, the GPU check and golden-hash verification.
"""
