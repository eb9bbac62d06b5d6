"""Test configuration: real PostgreSQL servers (tests.support.fixtures) and the in-process service."""

pytest_plugins = ["tests.support.fixtures", "tests.support.service", "tests.support.s3"]
