"""Load test: tests/load/driver.py drives a live server; test_load.py is the short CI run,
`python -m tests.load` (make load) the full one."""
