"""Load driver: many concurrent clients against a live server (testing/load/driver.py). The short CI
run is tests/load/test_load.py; `python -m testing.load` (make load) runs the full one."""
