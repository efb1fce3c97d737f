"""The node's own directories and its admin key: made once (installers, the agent, admin
commands), read by every job."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import Config
from ..errors import ConfigError
from ..files import write_private_file
from ..rootenv import use_private_tmp
from ..seed import generate_keypair, public_key_line

log = logging.getLogger("vmimagemanager.node")


ADMIN_KEY = "admin_ed25519"



def ensure_state_dirs(cfg: Config) -> None:
    """Root-only directories (0700/0711); created on first use with the right modes. Root's
    temporary files go to run_dir/tmp from here on (rootenv.use_private_tmp)."""
    for path, mode in ((cfg.state_dir, 0o700), (cfg.state_dir / "keys", 0o700),
                       (cfg.state_dir / "console", 0o700), (cfg.overlay_dir, 0o711)):
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
    use_private_tmp(cfg.run_dir)


def admin_key(cfg: Config) -> tuple[Path, str]:
    """The key root uses to log in to every guest: the site's, or the node's own, made at
    install time (`ensure_admin_key`), never by a job's hook."""
    path = cfg.site_root_key or cfg.state_dir / "keys" / ADMIN_KEY
    if not path.exists():  # the node's set-up, not the VM's boot: the job is held, not counted
        raise ConfigError(f"no admin key {path}: run 'vmimagemanager admin-key' once on this "
                          "node (install-queue and install-hooks do it)")
    return path, f"{public_key_line(path)} vmimagemanager-admin"


def ensure_admin_key(cfg: Config) -> Path:
    """Make the node's admin key if there is none (installers, the agent, admin commands)."""
    ensure_state_dirs(cfg)
    path = cfg.site_root_key or cfg.state_dir / "keys" / ADMIN_KEY
    if not path.exists():
        # Two installers at once: the key is written whole under a name of its own and linked
        # into place, so the one that loses the race uses the winner's key, never half of one.
        pair = generate_keypair(f"vmimagemanager-admin@{os.uname().nodename}")
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        write_private_file(tmp, pair.private_openssh)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path
