"""The composition root: builds the domain objects from the configuration and owns their life cycle."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from .backups import BackupManager
from .config import Config
from .database import Database
from .embedded import EmbeddedPostgres
from .encryption import AgeKeys
from .history import JobHistory
from .jobs import JobSlot
from .journal import JobJournal
from .notify import Notifier, parse_targets
from .restore import RestoreManager
from .scheduler import DailyScheduler
from .settings import SettingsStore
from .silence import SilenceWatch
from .store import ArchiveStore
from .transfer import TransferManager

_logger = logging.getLogger(__name__)


@dataclass
class App:
    config: Config
    database: Database
    store: ArchiveStore
    settings: SettingsStore
    slot: JobSlot
    backups: BackupManager
    scheduler: DailyScheduler
    restores: RestoreManager
    transfers: TransferManager
    history: JobHistory
    notifier: Notifier
    silence: SilenceWatch
    embedded: EmbeddedPostgres | None = None
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
        settings = SettingsStore(config.state_dir / "settings.json", config)
        slot = JobSlot(JobJournal(config.state_dir))
        history = JobHistory(config.state_dir / "history.json")
        notifier = Notifier(
            parse_targets(config.notify_urls, variable="APERTURE_BACKUP_NOTIFY_URLS"),
            notify_on=config.notify_on,
            database=database.name,
        )
        slot.on_end.extend([history.job_ended, notifier.job_ended])
        silence = SilenceWatch(
            store, notifier, timedelta(seconds=config.stale_after) if config.stale_after is not None else None
        )
        backups = BackupManager(store, database, settings, slot, pg_bin_dir=config.pg_bin_dir, keys=keys)
        scheduler = DailyScheduler(backups, settings, first_backup_delay=config.first_backup_delay)
        restores = RestoreManager(
            store,
            database,
            slot,
            backups,
            pg_bin_dir=config.pg_bin_dir,
            keys=keys,
            restore_timeout_seconds=config.restore_timeout,
            work_dir=config.state_dir / "tmp",
            # The embedded server (a first try on one machine) restores in place: as root, its data directory
            # sits in folders closed to the server's own user, and the checkpoint of a DROP DATABASE, which
            # opens files by their full path, would stop it.
            isolation="in-place" if embedded and config.restore_isolation == "auto" else config.restore_isolation,
        )
        transfers = TransferManager(
            store, database, slot, restores, max_upload_bytes=config.max_upload_bytes, pg_bin_dir=config.pg_bin_dir
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
            settings,
            slot,
            backups,
            scheduler,
            restores,
            transfers,
            history,
            notifier,
            silence,
            embedded,
        )

    def start(self, *, scheduler: bool = True) -> None:
        self.store.sweep()
        interrupted = self.slot.journal.recover() if self.slot.journal else None
        if interrupted is not None:
            self.history.interrupted(interrupted)
        self.restores.sweep_leftovers(interrupted)
        self.notifier.start()
        if scheduler:
            self.scheduler.start(catch_up=self.settings.current.schedule.catch_up)
        self.silence.start()
        self._started = True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the schedule, cancel a running job (its partial archive is removed), stop the embedded
        database."""
        self.scheduler.stop()
        self.silence.stop()
        self.slot.cancel_and_wait(timeout)
        # After the jobs: a job cancelled by the shutdown is still told, if the receiver answers at once.
        self.notifier.stop()
        if self.embedded is not None:
            self.embedded.stop()


def _head_decrypter(keys: AgeKeys) -> Callable[[bytes], bytes] | None:
    if not keys.decrypts:
        return None

    def decrypt_head(prefix: bytes) -> bytes:
        return keys.decrypt_head(prefix, archive="a file in the backup directory")

    return decrypt_head
