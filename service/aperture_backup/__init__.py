"""aperture-backup: backups and restores of Aperture's PostgreSQL database, served over gRPC."""

__version__ = "0.1.0"
