"""`python -m api.remote.host.main NAME`: the engine process (api/remote/host/host.py), started by a front-end.

The socket is bound before anything heavy is imported: when several front-ends start an engine at
once, every one but the first ends here at once (status 0), and the front-ends all connect to it.
The configuration (api.remote.entrypoints.EngineConfig) arrives pickled on stdin from the front-end.
"""

from __future__ import annotations

import errno
import pickle
import socket
import sys


def main(argv: list[str]) -> int:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind("\0" + argv[0])
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return 0  # another engine serves this group already
        raise
    listener.listen(256)
    config = pickle.load(sys.stdin.buffer)

    from api.logs import configure_logging
    from api.remote.host.host import Host

    configure_logging(config.log_level, config.log_dir, config.log_format)
    return Host(listener, config).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
