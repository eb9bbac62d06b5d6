"""The composition root: builds the domain objects from the configuration and owns their life cycle."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from . import toolchain
from .backups import BackupManager
from .config import Config
from .database import Database
from .embedded import EmbeddedPostgres
from .encryption import AgeKeys
from .history import JobHistory
from .jobs import JobSlot
from .journal import JobJournal
from .notify import Notifier, parse_targets
from .offsite import Offsite
from .restore import BuildSettings, RestoreManager
from .scheduler import DailyScheduler
from .settings import SettingsStore
from .silence import SilenceWatch
from .storage.catalog import Archives
from .storage.local import ArchiveStore
from .transfer import TransferManager
from .verify import VerifyManager

_logger = logging.getLogger(__name__)


@dataclass
class App:
    config: Config
    database: Database
    store: ArchiveStore
    archives: Archives
    settings: SettingsStore
    slot: JobSlot
    backups: BackupManager
    scheduler: DailyScheduler
    restores: RestoreManager
    transfers: TransferManager
    verifier: VerifyManager
    history: JobHistory
    notifier: Notifier
    silence: SilenceWatch
    embedded: EmbeddedPostgres | None = None
    offsite: Offsite | None = None
    _started: bool = field(default=False, repr=False)

    @classmethod
    def build(cls, config: Config) -> App:
        keys = config.age_keys()
        if keys.decrypts and keys.encrypts and not set(keys.identity_public_keys) & set(keys.recipients):
            _logger.warning(
                "the age identity (public key %s) is not among the recipients new archives are encrypted to "
                "(%s): this service will not be able to restore its own new backups",
                ", ".join(keys.identity_public_keys),
                ", ".join(keys.recipients),
            )
        # Files copied in without a manifest are looked into with the identity, to list what they hold.
        store = ArchiveStore(config.backup_dir, decrypt_head=_head_decrypter(keys))
        embedded = None
        url = config.database_url
        if url is None:
            embedded = EmbeddedPostgres(config.state_dir / "postgres")
            url = embedded.uri
        database = Database(url)
        archives, offsite = _archives(config, store, database, keys)
        settings = SettingsStore(config.state_dir / "settings.json", config)
        slot = JobSlot(JobJournal(config.state_dir))
        history = JobHistory(config.state_dir / "history.json")
        notifier = Notifier(
            parse_targets(config.notify_urls, variable="APERTURE_BACKUP_NOTIFY_URLS"),
            notify_on=config.notify_on,
            database=database.name,
        )
        slot.on_end.extend([history.job_ended, notifier.job_ended])
        if offsite is not None:
            offsite.on_failure.append(lambda backup, error: notifier.offsite_failing(backup.id, str(error)))
            offsite.on_success.append(notifier.offsite_recovered)
        # Silence is judged by every copy, the bucket's too: another replica's backup is a backup.
        silence = SilenceWatch(
            archives, notifier, timedelta(seconds=config.stale_after) if config.stale_after is not None else None
        )
        backups = BackupManager(
            archives,
            database,
            settings,
            slot,
            pg_bin_dir=config.pg_bin_dir,
            keys=keys,
            offsite=offsite,
            bucket_keep=config.s3_keep,
        )
        restores = RestoreManager(
            store,
            database,
            slot,
            backups,
            pg_bin_dir=config.pg_bin_dir,
            keys=keys,
            restore_timeout_seconds=config.restore_timeout,
            build_settings=BuildSettings(config.restore_maintenance_work_mem, config.restore_workers),
            work_dir=config.state_dir / "tmp",
            # The embedded server (a first try on one machine) restores in place: as root, its data directory
            # sits in folders closed to the server's own user, and the checkpoint of a DROP DATABASE, which
            # opens files by their full path, would stop it.
            isolation="in-place" if embedded and config.restore_isolation == "auto" else config.restore_isolation,
        )
        transfers = TransferManager(
            archives, database, slot, restores, max_upload_bytes=config.max_upload_bytes, pg_bin_dir=config.pg_bin_dir
        )
        verifier = VerifyManager(
            store,
            database,
            slot,
            backups,
            restores,
            verify_sql=config.verify_sql,
            schedule=config.verify,
            # For the reason the embedded server restores in place: no database is made or dropped on it.
            scratch_on_live_server=embedded is None,
        )
        scheduler = DailyScheduler(
            backups,
            settings,
            after_backup=verifier.after_scheduled_backup,
            first_backup_delay=config.first_backup_delay,
        )
        _logger.info(
            "backing up %s%s into %s%s",
            database.describe(),
            " (embedded)" if embedded else "",
            config.backup_dir,
            f", encrypted with age to {len(keys.recipients)} recipient(s)" if keys.encrypts else "",
        )
        return cls(
            config,
            database,
            store,
            archives,
            settings,
            slot,
            backups,
            scheduler,
            restores,
            transfers,
            verifier,
            history,
            notifier,
            silence,
            embedded,
            offsite,
        )

    def start(self, *, scheduler: bool = True) -> None:
        self.store.sweep()
        if self.offsite is not None:
            # In its own thread: a bucket that does not answer must not hold up start-up.
            self.offsite.start()
        interrupted = self.slot.journal.recover() if self.slot.journal else None
        if interrupted is not None:
            self.history.interrupted(interrupted)
        self.restores.sweep_leftovers(interrupted)
        self.notifier.start()
        if scheduler:
            self.scheduler.start(catch_up=self.settings.current.schedule.catch_up)
        self.silence.start()
        # Last, so that it does not compete with the rest of start-up for the CPU.
        toolchain.warm_up(self.restores.pg_bin_dir)
        self._started = True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the schedule, cancel a running job (its partial archive is removed), stop the embedded
        database."""
        self.scheduler.stop()
        self.silence.stop()
        self.slot.cancel_and_wait(timeout)
        if self.offsite is not None:
            self.offsite.stop()
        # After the jobs: a job cancelled by the shutdown is still told, if the receiver answers at once.
        self.notifier.stop()
        if self.embedded is not None:
            self.embedded.stop()


def _archives(
    config: Config, store: ArchiveStore, database: Database, keys: AgeKeys
) -> tuple[Archives, Offsite | None]:
    """The directory, and the bucket with its copier when one is configured."""
    if config.s3_url is None:
        return Archives(store), None
    from .storage.bucket import Bucket, BucketAddress  # the S3 library loads only when a bucket is configured

    bucket = Bucket(BucketAddress.parse(config.s3_url), endpoint_url=config.s3_endpoint)
    if not keys.encrypts:
        _logger.warning(
            "archives go to the bucket %s unencrypted: anyone who can read the bucket reads every user's data; "
            "set APERTURE_BACKUP_AGE_RECIPIENTS to encrypt them",
            bucket.describe(),
        )
    archives = Archives(store, bucket, read_lock=database.reading_archive)
    offsite = Offsite(archives, encrypted_only=keys.encrypts)
    archives.on_stored = lambda _: offsite.wake()
    return archives, offsite


def _head_decrypter(keys: AgeKeys) -> Callable[[bytes], bytes] | None:
    if not keys.decrypts:
        return None

    def decrypt_head(prefix: bytes) -> bytes:
        return keys.decrypt_head(prefix, archive="a file in the backup directory")

    return decrypt_head
