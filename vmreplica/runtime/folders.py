"""Refuse a storage root or NBD socket folder the agent cannot use, before it opens them: one
line that names the setting, the problem and what to do."""

from __future__ import annotations

import os

from vmreplica.config import SiteConfig
from vmreplica.errors import ConfigurationError
from vmreplica.producers.nbd_exports import UNIX_PATH_MAX_BYTES


def check_folders(config: SiteConfig) -> None:
    """Refuse a storage root or NBD socket folder the agent cannot use, before it opens them.

    :raises ConfigurationError: one line: the setting, what is wrong, what to do.
    """
    _usable_folder("root", config.root, "the storage root")
    socket_dir = config.nbd_socket_dir
    if socket_dir is not None:
        _usable_folder("nbd_socket_dir", socket_dir, "the NBD socket folder")
        shortest = len(os.fsencode(socket_dir / "v.sock"))
        if shortest > UNIX_PATH_MAX_BYTES:
            raise ConfigurationError(
                f"`nbd_socket_dir` {socket_dir}: too long for a Unix socket ({shortest} bytes "
                f"with a one-letter VM name, {UNIX_PATH_MAX_BYTES} allowed). Operator action: "
                "set `nbd_socket_dir` to a short folder such as /run/vmreplica."
            )


def _usable_folder(setting: str, path: os.PathLike[str], what: str) -> None:
    folder = os.fspath(path)
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ConfigurationError(
            f"`{setting}` {folder}: {what} is a file, not a folder. Operator action: set "
            f"`{setting}` to a folder, or move the file away."
        )
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"`{setting}` {folder}: cannot create {what}: {error.strerror or error}. Operator "
            f"action: create it for this user (uid {os.getuid()}), or set `{setting}` to a "
            "folder it can write."
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"`{setting}` {folder}: {what} is not writable by this user (uid {os.getuid()}). "
            f"Operator action: give it write access, or set `{setting}` to a folder it can "
            "write."
        )
