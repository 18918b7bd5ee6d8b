"""Tests of the load driver (testing/load/) and its short CI run against a live server."""
