"""What the tests and the benchmarks share: independent oracles (llama.cpp through llama-cpp-python's
own API, mlx-lm, a float64 numpy forward pass), the fixture models, a live server, the load driver.
bench/ and tests/ import from here; nothing here imports tests/."""
