"""Container health probe: exit 0 when the service on this host answers /health with 200.

`python3 -m api.healthcheck` is what the image's HEALTHCHECK and the Compose healthcheck run, so
the two always agree; it needs nothing but the standard library and api.errors' exit statuses
(slim images have no curl).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

from api.errors import EXIT_ERROR, EXIT_OK


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
        return EXIT_ERROR
    sys.stdout.write(f"{url}: {status}\n")
    return EXIT_OK if status == 200 else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
