"""The engine process boundary: front-end processes on one side, one engine process per device on the other.

    api/remote/
        messages.py     every message that crosses the socket, typed (both sides encode and decode here)
        wire.py         the socket, the shared-memory rings and board, the job and reply records
        entrypoints.py  the `python -m` modules this package starts (the engine, a model's preparation)
        frontend/       torch-free: runs inside every HTTP front-end
            link.py         EngineLink: admit, decode, ship pixels, await answers; replays after an engine death
            spawner.py      which front-ends share an engine, and starting it
            supervisor.py   connect, reconnect, and replace an engine that stalls
        host/           the engine process: torch, the model, the batcher
            host.py         Host: accepts front-ends, queues their jobs, sends replies and heartbeats
            swapper.py      a model swap as one state machine (idle, loading, switching, retiring)
            rules.py        what a swap checks: which file (confined to the models folder), room, compatibility
            aside.py        a killable process with a deadline and a memory ceiling (a swap's load runs there)
            main.py         `python -m api.remote.host.main`: the engine process's entry point
            prepare.py      `python -m api.remote.host.prepare`: a new model built and checked in its own process

Layers: api.engine <- api.remote <- api.http <- api.ops (tests/unit/test_layers.py holds it); the
front-end half imports no torch, timm or OpenVINO.
"""
