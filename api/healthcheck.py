"""Container health probe: exit 0 when the service on this host answers /health with 200.

`python3 -m api.healthcheck` is what the image's HEALTHCHECK and the Compose healthcheck run, so
the two always agree; it needs nothing but the standard library (slim images have no curl).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("API_PORT", "8000")
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status = response.status
    except urllib.error.HTTPError as error:  # 503 while loading or after a failed load
        status = error.code
    except OSError as error:
        sys.stdout.write(f"{url}: {error}\n")
        return 1
    sys.stdout.write(f"{url}: {status}\n")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
