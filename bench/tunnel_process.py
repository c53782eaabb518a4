"""Our tunnel, alone in a process: hub_spawner's SSH pool + Tunnels.open_local, as the spawner
uses them. Prints the local port, then forwards until killed."""

import asyncio
import sys

from hub_spawner.ssh import SSHTarget, default_pool
from hub_spawner.tunnel import default_tunnels


async def main(host, port, user, key, known_hosts, dest_host, dest_port):
    target = SSHTarget(host, int(port), user, key, known_hosts)
    connection = await default_pool.get(target)
    local_port = await default_tunnels.open_local(
        "bench", connection, "127.0.0.1", dest_host, int(dest_port)
    )
    print(local_port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
