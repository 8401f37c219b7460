"""Make sure a headless Chromium exists for the report tests (Debian's package `chromium`).

`python tests/browser_setup.py --install` installs it with apt-get when missing (CI runs as root);
`chromium_path()` tells tests where it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def chromium_path() -> str | None:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def install() -> int:
    if chromium_path():
        return 0
    if os.geteuid() != 0:
        print("chromium is missing: install Debian's 'chromium' package (apt-get install chromium)", file=sys.stderr)
        return 1
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Two checkouts installing at once on a fresh machine both reach apt-get: wait for the other's
    # dpkg lock (up to 10 minutes) instead of failing on it.
    wait_for_lock = ["-o", "DPkg::Lock::Timeout=600"]
    for cmd in (
        ["apt-get", *wait_for_lock, "update", "-q"],
        ["apt-get", *wait_for_lock, "install", "-y", "-q", "--no-install-recommends", "chromium"],
    ):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            print(f"chromium install failed: `{' '.join(cmd)}` (see its lines above); install Debian's "
                  "'chromium' package and rerun", file=sys.stderr)
            return 2
    return 0 if chromium_path() else 1


if __name__ == "__main__":
    sys.exit(install() if "--install" in sys.argv else (0 if chromium_path() else 1))
