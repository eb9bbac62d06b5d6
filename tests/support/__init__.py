"""Test support: real PostgreSQL servers, an Aperture-shaped seed, and schema + content fingerprints.

Nothing here mocks PostgreSQL; every helper talks to a running server.
"""
