"""The engine layer: data, model, seeding, training, inference passes, workers and backends.

It imports only torch, numpy, the standard library and itself (plus `study.protocol.plan`,
whose schema imports are for annotations only), so a bare GPU machine can run it;
`tests/test_architecture.py` holds that rule.
"""
